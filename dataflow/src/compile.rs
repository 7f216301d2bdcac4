//! Compiles a [`FeatureSet`] into what the graph runs: per entity, the
//! projection of source events into window records and the fold that turns
//! the records inside each window into the entity's row.
//!
//! Features that aggregate the same events of the same window share state (a
//! "cell"): `amount_sum_24h`, `amount_mean_24h` and `amount_std_24h` read one
//! set of moments; `distinct_countries_24h` and `top_country_24h` one
//! multiset.

use std::rc::Rc;
use std::sync::Arc;

use operators::aggregate::{Aggregate, Max, Min, Mode, Moments, RowAggregate};
use operators::window::{prefetch, WindowFold};
use schemas::features::{
    click_field, click_field_is, click_field_ref, click_has_field, txn_field, txn_field_is,
    txn_field_ref, txn_has_field, Datum, DatumRef, Schema,
};
use schemas::{Aggregation, Click, FeatureSet, Key, Txn, Value};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// A decoded event of one of the sources.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Event {
    Txn(Txn),
    Click(Click),
}

impl Event {
    /// The schema of the event.
    pub fn schema(&self) -> Schema {
        match self {
            Event::Txn(_) => Schema::Txn,
            Event::Click(_) => Schema::Click,
        }
    }

    /// Field `index` of the event's schema; `None` when absent.
    pub fn field(&self, index: usize) -> Option<Datum> {
        match self {
            Event::Txn(t) => txn_field(t, index),
            Event::Click(c) => click_field(c, index),
        }
    }

    /// Field `index` of the event's schema, borrowed; `None` when absent.
    pub fn field_ref(&self, index: usize) -> Option<DatumRef<'_>> {
        match self {
            Event::Txn(t) => txn_field_ref(t, index),
            Event::Click(c) => click_field_ref(c, index),
        }
    }

    /// Whether field `index` is present (optional fields may be absent).
    pub fn has_field(&self, index: usize) -> bool {
        match self {
            Event::Txn(t) => txn_has_field(t, index),
            Event::Click(c) => click_has_field(c, index),
        }
    }

    /// Whether field `index` equals `value`.
    pub fn field_is(&self, index: usize, value: &Datum) -> bool {
        match self {
            Event::Txn(t) => txn_field_is(t, index, value),
            Event::Click(c) => click_field_is(c, index, value),
        }
    }

    /// The event time (ms since the epoch).
    pub fn event_time(&self) -> i64 {
        match self {
            Event::Txn(t) => t.event_time,
            Event::Click(c) => c.event_time,
        }
    }
}

/// A field of a record: an integer, or a string held exactly, inline (no
/// heap allocation) when it has at most 15 bytes.
///
/// Only equality and some total order matter (strings feed distinct counts;
/// modes, mins and maxes read integers), but the order is still that of the
/// strings among short strings: bytes packed big-endian, then the length.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Column {
    Int(i64),
    /// A string of at most 15 bytes: bytes 0-7, then bytes 8-14 and the length.
    Short([u64; 2]),
    /// A longer string.
    Long(Arc<str>),
}

impl Column {
    fn of(datum: DatumRef<'_>) -> Column {
        match datum {
            DatumRef::Int(i) => Column::Int(i),
            DatumRef::Str(s) if s.len() <= 15 => {
                let mut bytes = [0u8; 16];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                bytes[15] = s.len() as u8;
                let (high, low) = bytes.split_at(8);
                Column::Short([
                    u64::from_be_bytes(high.try_into().expect("8 bytes")),
                    u64::from_be_bytes(low.try_into().expect("8 bytes")),
                ])
            }
            DatumRef::Str(s) => Column::Long(Arc::from(s)),
        }
    }

    fn as_int(&self) -> Option<i64> {
        match self {
            Column::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// What one entity's windows keep of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The event's time field (ms), for `last` and `last_time`.
    pub time: i64,
    /// The windows the record takes part in (bit per window index).
    pub windows: u32,
    /// The cells the record contributes to (bit per cell).
    pub cells: u64,
    /// The fields the entity's features read, by column: inline for up to
    /// three columns (no heap allocation per record).
    pub columns: SmallVec<[Column; 3]>,
}

/// The state kept per cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    Count,
    Moments,
    Min,
    Max,
    /// Distinct count and mode.
    Multiset,
    /// `last`: the maximum of (time, value).
    Last,
    /// `last_time`: the maximum time.
    LastTime,
}

impl Family {
    fn of(aggregation: Aggregation) -> Family {
        match aggregation {
            Aggregation::Count => Family::Count,
            Aggregation::Sum | Aggregation::Mean | Aggregation::Std => Family::Moments,
            Aggregation::Min => Family::Min,
            Aggregation::Max => Family::Max,
            Aggregation::DistinctCount | Aggregation::Mode => Family::Multiset,
            Aggregation::Last => Family::Last,
            Aggregation::LastTime => Family::LastTime,
        }
    }
}

/// A cell: one family of state over the records of one window that meet
/// one condition.
#[derive(Debug, Clone, PartialEq)]
struct Cell {
    window: usize,
    family: Family,
    /// Index into the record's columns, for cells that read a field.
    column: Option<usize>,
}

/// A feature of an entity's row: the aggregation of a cell.
#[derive(Debug, Clone, Copy)]
struct Output {
    cell: usize,
    /// The cell's window index.
    window: usize,
    aggregation: Aggregation,
}

/// A cell of a source: its index, its filter (schema field, value), and the
/// field that must be present.
type SourceCell = (usize, Vec<(usize, Datum)>, Option<usize>);

/// How one source's events become records of an entity.
#[derive(Debug, Clone)]
struct Projection {
    schema: Schema,
    /// The key field, a string.
    key: usize,
    /// Schema field indices, by record column.
    columns: Vec<usize>,
    /// Per cell of this source: its index, filter, and the field that must be present.
    cells: Vec<SourceCell>,
}

/// The compiled plan of one entity.
#[derive(Debug)]
pub struct EntityPlan {
    /// Index into the feature set's entities.
    pub index: u8,
    pub name: String,
    /// Distinct windows (ms), ascending: the widest is last.
    pub windows: Vec<u64>,
    cells: Vec<Cell>,
    /// Cells per window index.
    by_window: Vec<Vec<usize>>,
    /// Per feature, in row order.
    outputs: Vec<Output>,
    /// Per source index of the feature set: the projection, if the source feeds the entity.
    projections: Vec<Option<Projection>>,
}

impl EntityPlan {
    /// Compiles entity `index` of `set`.
    pub fn compile(set: &FeatureSet, index: usize) -> EntityPlan {
        let entity = &set.entities[index];
        let windows = entity.windows();
        let mut cells: Vec<Cell> = Vec::new();
        // Per cell: its defining condition, to share cells between features.
        #[allow(clippy::type_complexity)]
        let mut keys: Vec<(usize, usize, Family, Option<usize>, Vec<(usize, Datum)>)> = Vec::new();
        let mut projections: Vec<Option<Projection>> = vec![None; set.sources.len()];
        let mut outputs = Vec::new();
        for feature in &entity.features {
            let window = windows
                .iter()
                .position(|w| *w == feature.window_ms)
                .expect("windows lists every feature's window");
            let family = Family::of(feature.aggregation);
            let source = &set.sources[feature.source];
            let projection = projections[feature.source].get_or_insert_with(|| Projection {
                schema: source.schema,
                key: source
                    .schema
                    .field(&entity.key)
                    .expect("validated: the key is a field of every source of the entity")
                    .0,
                columns: Vec::new(),
                cells: Vec::new(),
            });
            // `last_time` reads the record's time, not a column.
            let field = match family {
                Family::LastTime => None,
                _ => feature.field,
            };
            let key = (
                window,
                feature.source,
                family,
                field,
                feature.filter.clone(),
            );
            let cell = match keys.iter().position(|k| *k == key) {
                Some(cell) => cell,
                None => {
                    let column =
                        field.map(|f| match projection.columns.iter().position(|c| *c == f) {
                            Some(c) => c,
                            None => {
                                projection.columns.push(f);
                                projection.columns.len() - 1
                            }
                        });
                    cells.push(Cell {
                        window,
                        family,
                        column,
                    });
                    keys.push(key);
                    projection
                        .cells
                        .push((cells.len() - 1, feature.filter.clone(), field));
                    cells.len() - 1
                }
            };
            outputs.push(Output {
                cell,
                window,
                aggregation: feature.aggregation,
            });
        }
        let by_window = (0..windows.len())
            .map(|w| (0..cells.len()).filter(|c| cells[*c].window == w).collect())
            .collect();
        EntityPlan {
            index: index as u8,
            name: entity.name.clone(),
            windows,
            cells,
            by_window,
            outputs,
            projections,
        }
    }

    /// Whether events of source `source` feed this entity.
    pub fn reads(&self, source: usize) -> bool {
        self.projections.get(source).is_some_and(Option::is_some)
    }

    /// The key of an event of source `source` for this entity; `None` when
    /// the source does not feed it.
    pub fn key<'e>(&self, source: usize, event: &'e Event) -> Option<&'e str> {
        let projection = self.projections.get(source)?.as_ref()?;
        match event.field_ref(projection.key) {
            Some(DatumRef::Str(key)) => Some(key),
            _ => None,
        }
    }

    /// The key and record of an event of source `source`; `None` when the
    /// source does not feed the entity or the event meets no feature's
    /// condition.
    pub fn project(&self, source: usize, event: &Event) -> Option<(Key, Record)> {
        let record = self.record(source, event)?;
        let key = self
            .key(source, event)
            .expect("validated: keys are required string fields");
        Some((Key::from(key), record))
    }

    /// The record of an event of source `source` (its key is
    /// [`Self::key`]); `None` as for [`Self::project`].
    pub fn record(&self, source: usize, event: &Event) -> Option<Record> {
        let projection = self.projections.get(source)?.as_ref()?;
        debug_assert_eq!(projection.schema, event.schema());
        let widest = self.windows.len() - 1;
        let mut cells = 0u64;
        let mut windows = 1u32 << widest;
        for (cell, filter, field) in &projection.cells {
            let present = field.is_none_or(|f| event.has_field(f));
            if present && filter.iter().all(|(f, v)| event.field_is(*f, v)) {
                cells |= 1 << cell;
                windows |= 1 << self.cells[*cell].window;
            }
        }
        if cells == 0 {
            return None;
        }
        let columns = projection
            .columns
            .iter()
            .map(|f| Column::of(event.field_ref(*f).unwrap_or(DatumRef::Int(0))))
            .collect();
        Some(Record {
            time: event.event_time(),
            windows,
            cells,
            columns,
        })
    }

    /// The fold of a key with no records.
    pub fn fold(self: &Rc<Self>) -> EntityFold {
        EntityFold {
            states: self
                .cells
                .iter()
                .map(|c| match c.family {
                    Family::Count => State::Count(0),
                    Family::Moments => State::Moments(Moments::default()),
                    Family::Min => State::Min(Min::default()),
                    Family::Max => State::Max(Max::default()),
                    Family::Multiset => State::Multiset(Mode::default()),
                    Family::Last => State::Last(Max::default()),
                    Family::LastTime => State::LastTime(Max::default()),
                })
                .collect(),
            plan: Rc::clone(self),
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Count(i64),
    Moments(Moments),
    Min(Min<i64>),
    Max(Max<i64>),
    Multiset(Mode<Column>),
    Last(Max<(i64, i64)>),
    LastTime(Max<i64>),
}

fn int(record: &Record, column: Option<usize>) -> i64 {
    column
        .and_then(|c| record.columns[c].as_int())
        .expect("validated: the aggregation reads an integer column")
}

/// `value` enters (or leaves) the window of aggregate `a`.
#[inline]
fn step<T: ?Sized, A: Aggregate<T>>(a: &mut A, value: &T, enter: bool) {
    if enter {
        a.insert(value)
    } else {
        a.retract(value)
    }
}

impl State {
    #[inline]
    fn apply(&mut self, cell: &Cell, record: &Record, enter: bool) {
        match self {
            State::Count(n) => *n += if enter { 1 } else { -1 },
            State::Moments(m) => step(m, &int(record, cell.column), enter),
            State::Min(m) => step(m, &int(record, cell.column), enter),
            State::Max(m) => step(m, &int(record, cell.column), enter),
            State::Multiset(m) => {
                let column = cell.column.expect("multisets read a column");
                step(m, &record.columns[column], enter)
            }
            State::Last(m) => step(m, &(record.time, int(record, cell.column)), enter),
            State::LastTime(m) => step(m, &record.time, enter),
        }
    }
}

/// The per-key state of an entity: one state per cell.
#[derive(Debug, Clone)]
pub struct EntityFold {
    states: Vec<State>,
    plan: Rc<EntityPlan>,
}

impl EntityFold {
    #[inline]
    fn apply(&mut self, window: usize, record: &Record, enter: bool) {
        for &c in &self.plan.by_window[window] {
            if record.cells & (1 << c) != 0 {
                self.states[c].apply(&self.plan.cells[c], record, enter);
            }
        }
    }
}

impl WindowFold<Record> for EntityFold {
    #[inline]
    fn windows_of(&self, record: &Record) -> u32 {
        record.windows
    }
    #[inline]
    fn enter(&mut self, window: usize, record: &Record) {
        self.apply(window, record, true);
    }
    #[inline]
    fn leave(&mut self, window: usize, record: &Record) {
        self.apply(window, record, false);
    }
    #[inline]
    fn prefetch(&self, window: Option<usize>) {
        match window {
            Some(w) => {
                for &c in &self.plan.by_window[w] {
                    prefetch(&self.states[c]);
                }
            }
            None => prefetch(&self.states[..]),
        }
    }
}

/// Saturating conversion of an exact sum to a feature value.
fn saturate(sum: i128) -> i64 {
    sum.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

impl EntityFold {
    /// The row's values, in feature order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = Value> + '_ {
        self.plan
            .outputs
            .iter()
            .map(|o| self.value(o.cell, o.aggregation))
    }

    /// The value of output `(cell, aggregation)`.
    #[inline]
    fn value(&self, cell: usize, aggregation: Aggregation) -> Value {
        match (&self.states[cell], aggregation) {
            (State::Count(n), _) => Value::Int(*n),
            (State::Moments(m), Aggregation::Sum) => Value::Int(saturate(m.sum)),
            (State::Moments(m), Aggregation::Mean) => Value::Float(m.mean().unwrap_or(0.0)),
            (State::Moments(m), _) => Value::Float(m.population_std().unwrap_or(0.0)),
            (State::Min(m), _) => Value::Int(m.value().unwrap_or(0)),
            (State::Max(m), _) | (State::LastTime(m), _) => Value::Int(m.value().unwrap_or(0)),
            (State::Multiset(m), Aggregation::Mode) => {
                Value::Int(m.mode().and_then(Column::as_int).unwrap_or(0))
            }
            (State::Multiset(m), _) => Value::Int(m.distinct()),
            (State::Last(m), _) => Value::Int(m.value().map_or(0, |(_, v)| v)),
        }
    }
}

impl RowAggregate<Record> for EntityFold {
    /// Shared: the `+1` of a change and the `-1` of the next are one allocation.
    type Row = Arc<[Value]>;
    fn row(&self) -> Arc<[Value]> {
        // Not through `values()`: collecting a slice's `map` (a trusted
        // length) allocates the `Arc` once, where an opaque iterator goes
        // through a `Vec` first.
        self.plan
            .outputs
            .iter()
            .map(|o| self.value(o.cell, o.aggregation))
            .collect()
    }

    #[inline]
    fn prefetch_row(row: &Arc<[Value]>) {
        prefetch(&row[..]);
    }

    /// Recomputes only the outputs over the changed windows: a departure
    /// from the 1 min window recomputes its count, not the 24 h moments.
    fn refresh(&self, windows: u32, row: &Arc<[Value]>) -> Option<Arc<[Value]>> {
        let stale = |o: &Output| windows & (1 << o.window) != 0;
        let changed = self
            .plan
            .outputs
            .iter()
            .zip(row.iter())
            .any(|(o, old)| stale(o) && self.value(o.cell, o.aggregation) != *old);
        // One allocation, of the exact size, only for a changed row.
        changed.then(|| {
            self.plan
                .outputs
                .iter()
                .zip(row.iter())
                .map(|(o, old)| match stale(o) {
                    true => self.value(o.cell, o.aggregation),
                    false => *old,
                })
                .collect()
        })
    }
}

/// The plans of every entity of `set`.
pub fn compile(set: &FeatureSet) -> Vec<Rc<EntityPlan>> {
    (0..set.entities.len())
        .map(|i| Rc::new(EntityPlan::compile(set, i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key's per-cell states are 48 bytes each (packed `Moments`), so a
    /// key visit touches as few cache lines as its cells need.
    #[test]
    fn cell_states_stay_small() {
        assert_eq!(std::mem::size_of::<State>(), 48);
    }

    /// Columns of strings are equal iff the strings are, on both sides of
    /// the inline limit, and short strings keep the strings' order.
    #[test]
    fn string_columns_are_exact() {
        let strings = [
            "",
            "a",
            "a\0",
            "a\u{1}",
            "ab",
            "b",
            "m-19999",
            "m-2",
            "fifteen_bytes_x",
            "sixteen_bytes_xy",
            "sixteen_bytes_xz",
            "fifteen_bytes_y",
            "été",
        ];
        for a in strings {
            for b in strings {
                let (x, y) = (Column::of(DatumRef::Str(a)), Column::of(DatumRef::Str(b)));
                assert_eq!(x == y, a == b, "{a:?} vs {b:?}");
                if a.len() <= 15 && b.len() <= 15 {
                    assert_eq!(x.cmp(&y), a.cmp(b), "{a:?} vs {b:?}");
                }
            }
        }
        assert!(matches!(
            Column::of(DatumRef::Str("fifteen_bytes_x")),
            Column::Short(_)
        ));
        assert!(matches!(
            Column::of(DatumRef::Str("sixteen_bytes_xy")),
            Column::Long(_)
        ));
    }
}
