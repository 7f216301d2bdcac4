//! Hand-written Avro binary encoding of the shipped schema versions: the
//! decode hot path. Field order and types follow `schemas/avro/*.avsc`
//! exactly; `tests/codec.rs` checks these against apache-avro both ways.

use crate::event::{Channel, Click, ClickAction, Label, Txn};

/// Why Avro bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AvroError {
    #[error("truncated avro datum")]
    Truncated,
    #[error("varint longer than its type")]
    VarintOverflow,
    #[error("negative or oversized length")]
    BadLength,
    #[error("string is not utf-8")]
    InvalidUtf8,
    #[error("boolean byte {0} is neither 0 nor 1")]
    BadBool(u8),
    #[error("enum index {0} out of range")]
    BadEnumIndex(i64),
    #[error("union index {0} out of range")]
    BadUnionIndex(i64),
    #[error("{0} trailing bytes after the datum")]
    TrailingBytes(usize),
    #[error("{0}")]
    Other(Box<str>),
}

impl AvroError {
    /// A short stable identifier, e.g. for a dead-letter header.
    pub fn reason(&self) -> &'static str {
        match self {
            AvroError::Truncated => "avro_truncated",
            AvroError::TrailingBytes(_) => "avro_trailing_bytes",
            _ => "avro_malformed",
        }
    }
}

/// A cursor over one Avro datum.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self) -> Result<(), AvroError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(AvroError::TrailingBytes(n)),
        }
    }

    #[inline]
    fn varint(&mut self, max_bytes: usize) -> Result<u64, AvroError> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(AvroError::Truncated);
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(AvroError::VarintOverflow)
    }

    #[inline]
    pub(crate) fn long(&mut self) -> Result<i64, AvroError> {
        let v = self.varint(10)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    #[inline]
    pub(crate) fn int(&mut self) -> Result<i32, AvroError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| AvroError::VarintOverflow)
    }

    #[inline]
    pub(crate) fn boolean(&mut self) -> Result<bool, AvroError> {
        let Some(&byte) = self.buf.get(self.pos) else {
            return Err(AvroError::Truncated);
        };
        self.pos += 1;
        match byte {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(AvroError::BadBool(b)),
        }
    }

    #[inline]
    pub(crate) fn string(&mut self) -> Result<String, AvroError> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| AvroError::BadLength)?;
        let end = self.pos.checked_add(len).ok_or(AvroError::BadLength)?;
        let Some(bytes) = self.buf.get(self.pos..end) else {
            return Err(AvroError::Truncated);
        };
        self.pos = end;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| AvroError::InvalidUtf8)
    }

    #[inline]
    fn index(&mut self, len: usize, union: bool) -> Result<usize, AvroError> {
        let i = self.long()?;
        match usize::try_from(i) {
            Ok(u) if u < len => Ok(u),
            _ if union => Err(AvroError::BadUnionIndex(i)),
            _ => Err(AvroError::BadEnumIndex(i)),
        }
    }

    #[inline]
    fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, AvroError>,
    ) -> Result<Option<T>, AvroError> {
        match self.index(2, true)? {
            0 => Ok(None),
            _ => read(self).map(Some),
        }
    }
}

#[inline]
pub(crate) fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[inline]
fn write_str(out: &mut Vec<u8>, s: &str) {
    write_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

#[inline]
fn write_opt<T>(out: &mut Vec<u8>, v: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(2); // zigzag(1)
            write(out, v);
        }
    }
}

const CHANNELS: [Channel; 3] = [Channel::Pos, Channel::Ecom, Channel::Atm];
const ACTIONS: [ClickAction; 3] = [
    ClickAction::View,
    ClickAction::AddToCart,
    ClickAction::Purchase,
];

fn channel_index(c: Channel) -> i64 {
    match c {
        Channel::Pos => 0,
        Channel::Ecom => 1,
        Channel::Atm => 2,
    }
}

fn action_index(a: ClickAction) -> i64 {
    match a {
        ClickAction::View => 0,
        ClickAction::AddToCart => 1,
        ClickAction::Purchase => 2,
    }
}

/// Reads a `txn` datum written with shipped `version` (1 or 2).
pub(crate) fn read_txn(r: &mut Reader<'_>, version: u32) -> Result<Txn, AvroError> {
    let mut t = Txn {
        event_id: r.string()?,
        card_id: r.string()?,
        user_id: r.string()?,
        merchant_id: r.string()?,
        mcc: r.int()?,
        amount_minor: r.long()?,
        currency: r.string()?,
        country: r.string()?,
        channel: CHANNELS[r.index(3, false)?],
        event_time: r.long()?,
        device_id: None,
        ip_country: None,
    };
    if version >= 2 {
        t.device_id = r.optional(Reader::string)?;
        t.ip_country = r.optional(Reader::string)?;
    }
    Ok(t)
}

/// Writes `t` as a `txn` datum of shipped `version`; fields newer than
/// `version` are dropped.
pub(crate) fn write_txn(t: &Txn, version: u32, out: &mut Vec<u8>) {
    write_str(out, &t.event_id);
    write_str(out, &t.card_id);
    write_str(out, &t.user_id);
    write_str(out, &t.merchant_id);
    write_long(out, i64::from(t.mcc));
    write_long(out, t.amount_minor);
    write_str(out, &t.currency);
    write_str(out, &t.country);
    write_long(out, channel_index(t.channel));
    write_long(out, t.event_time);
    if version >= 2 {
        write_opt(out, t.device_id.as_deref(), write_str);
        write_opt(out, t.ip_country.as_deref(), write_str);
    }
}

/// Reads a `click` datum written with shipped `version` (1 or 2).
pub(crate) fn read_click(r: &mut Reader<'_>, version: u32) -> Result<Click, AvroError> {
    let mut c = Click {
        event_id: r.string()?,
        user_id: r.string()?,
        session_id: r.string()?,
        item_id: r.string()?,
        category: r.string()?,
        action: ACTIONS[r.index(3, false)?],
        event_time: r.long()?,
        dwell_ms: None,
    };
    if version >= 2 {
        c.dwell_ms = r.optional(Reader::int)?;
    }
    Ok(c)
}

/// Writes `c` as a `click` datum of shipped `version`.
pub(crate) fn write_click(c: &Click, version: u32, out: &mut Vec<u8>) {
    write_str(out, &c.event_id);
    write_str(out, &c.user_id);
    write_str(out, &c.session_id);
    write_str(out, &c.item_id);
    write_str(out, &c.category);
    write_long(out, action_index(c.action));
    write_long(out, c.event_time);
    if version >= 2 {
        write_opt(out, c.dwell_ms, |out, d| write_long(out, i64::from(d)));
    }
}

/// Reads a `label` datum (version 1).
pub(crate) fn read_label(r: &mut Reader<'_>, _version: u32) -> Result<Label, AvroError> {
    Ok(Label {
        event_id: r.string()?,
        card_id: r.string()?,
        is_fraud: r.boolean()?,
        fraud_type: r.optional(Reader::string)?,
        label_time: r.long()?,
    })
}

/// Writes `l` as a `label` datum (version 1).
pub(crate) fn write_label(l: &Label, _version: u32, out: &mut Vec<u8>) {
    write_str(out, &l.event_id);
    write_str(out, &l.card_id);
    out.push(u8::from(l.is_fraud));
    write_opt(out, l.fraud_type.as_deref(), write_str);
    write_long(out, l.label_time);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn longs_round_trip(v in any::<i64>()) {
            let mut out = Vec::new();
            write_long(&mut out, v);
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.long().unwrap(), v);
            prop_assert!(r.finish().is_ok());
        }
    }

    #[test]
    fn overlong_varints_and_lengths_are_errors() {
        assert_eq!(
            Reader::new(&[0xff; 11]).long(),
            Err(AvroError::VarintOverflow)
        );
        assert_eq!(Reader::new(&[0x80]).long(), Err(AvroError::Truncated));
        assert_eq!(
            Reader::new(&[1]).string(),
            Err(AvroError::BadLength),
            "length -1"
        );
        assert_eq!(Reader::new(&[4, b'a']).string(), Err(AvroError::Truncated));
        let mut out = Vec::new();
        write_long(&mut out, i64::from(i32::MAX) + 1);
        assert_eq!(Reader::new(&out).int(), Err(AvroError::VarintOverflow));
    }
}
