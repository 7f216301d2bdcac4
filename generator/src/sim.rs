//! The simulation: activities arrive as a Poisson process whose rate follows
//! a daily rhythm; each schedules its events into a queue ordered by event
//! time, from which the iterator yields. The output is therefore in
//! non-decreasing event-time order and a pure function of the config.

use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use schemas::{Channel, Click, ClickAction, EventKind, Label, Txn};

use crate::population::{
    log_normal, mcc_index, push_id, IdScheme, Population, CARD_ID, CATEGORIES, COUNTRIES,
    DEVICE_ID, ITEM_ID, MCCS, MERCHANT_ID, USER_ID,
};

/// A labelled fraud pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FraudKind {
    /// Bursts of small online amounts at many merchants on one card.
    CardTesting,
    /// A user's account used from a new country and device for high amounts.
    AccountTakeover,
    /// Cards used at a breached merchant, defrauded elsewhere days later.
    CompromisedMerchant,
}

impl FraudKind {
    pub const ALL: [FraudKind; 3] = [
        FraudKind::CardTesting,
        FraudKind::AccountTakeover,
        FraudKind::CompromisedMerchant,
    ];

    /// The `fraud_type` written on labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FraudKind::CardTesting => "card_testing",
            FraudKind::AccountTakeover => "account_takeover",
            FraudKind::CompromisedMerchant => "compromised_merchant",
        }
    }
}

/// One generated event. Transactions carry their ground truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenEvent {
    Txn { txn: Txn, fraud: Option<FraudKind> },
    Click(Click),
    Label(Label),
}

impl GenEvent {
    /// Event time (label time for labels), ms.
    pub fn time_ms(&self) -> i64 {
        match self {
            GenEvent::Txn { txn, .. } => txn.event_time,
            GenEvent::Click(c) => c.event_time,
            GenEvent::Label(l) => l.label_time,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            GenEvent::Txn { .. } => EventKind::Txn,
            GenEvent::Click(_) => EventKind::Click,
            GenEvent::Label(_) => EventKind::Label,
        }
    }

    /// The Kafka key: card for transactions and labels, user for clicks.
    pub fn key(&self) -> &str {
        match self {
            GenEvent::Txn { txn, .. } => &txn.card_id,
            GenEvent::Click(c) => &c.user_id,
            GenEvent::Label(l) => &l.card_id,
        }
    }
}

/// What to simulate. `Default` gives a small deterministic world starting
/// at 2023-11-14T22:13:20Z, suitable for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Simulated time of the first activity, ms since the epoch.
    pub start_time_ms: i64,
    /// Number of users.
    pub users: u32,
    /// Mean number of cards per user (each user has at least one).
    pub cards_per_user: f64,
    /// Number of merchants.
    pub merchants: u32,
    /// Number of catalogue items.
    pub items: u32,
    /// Mean events per simulated second over a day (the rhythm varies it).
    pub events_per_sec: f64,
    /// Share of activities that are browsing sessions (the rest are
    /// card-present or standalone payments).
    pub session_share: f64,
    /// Target share of transactions that are fraudulent.
    pub fraud_rate: f64,
    /// Mean delay from a fraudulent transaction to its label, ms.
    pub label_delay_ms: i64,
    /// Share of genuine transactions that also get a (negative) label.
    pub negative_label_rate: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            start_time_ms: 1_700_000_000_000,
            users: 1_000,
            cards_per_user: 1.5,
            merchants: 300,
            items: 1_000,
            events_per_sec: 100.0,
            session_share: 0.5,
            fraud_rate: 0.01,
            label_delay_ms: 24 * 3_600_000,
            negative_label_rate: 0.0,
        }
    }
}

/// Relative activity per hour of day (UTC), mean 1.
const RHYTHM: [f64; 24] = [
    0.35, 0.25, 0.2, 0.18, 0.2, 0.3, 0.55, 0.85, 1.1, 1.2, 1.25, 1.35, 1.45, 1.4, 1.3, 1.3, 1.4,
    1.55, 1.7, 1.75, 1.6, 1.3, 0.95, 0.62,
];
const RHYTHM_MAX: f64 = 1.75;

/// The daily rhythm at `time_ms`: relative activity of that hour (UTC), mean 1
/// over a day. `events_per_sec` times this is the event rate at that hour (in
/// steady state).
pub fn rhythm_at(time_ms: i64) -> f64 {
    RHYTHM[(time_ms.rem_euclid(DAY_MS) / HOUR_MS) as usize]
}
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

// Session shape, also used to convert events/s into activities/s.
const VIEW_CONTINUE: f64 = 0.8; // views per session: 1 + geometric, mean 5
const CART_P: f64 = 0.25;
const BUY_P: f64 = 0.5;
/// Mean events of a session: views, carts, and (purchase click + txn).
const SESSION_EVENTS: f64 = 5.0 * (1.0 + CART_P) + 0.76 * BUY_P * 2.0;
const SESSION_TXNS: f64 = 0.76 * BUY_P;
/// Mean fraudulent transactions and genuine events per fraud episode.
const EPISODE_FRAUD_TXNS: f64 = 0.4 * 14.0 + 0.4 * 3.5 + 0.2 * 35.0 * 0.4 * 2.0;
const EPISODE_OTHER_EVENTS: f64 = 0.4 * 3.0 + 0.2 * 35.0;

/// An endless, deterministic stream of events; use `take(n)` or stop at a time.
///
/// Pending work is kept compact: a queue of small `Copy` records (a
/// transaction to emit, a label, a click, or the next step of a browsing
/// session) ordered by (time, sequence). A session schedules only its next
/// step, so the queue holds about one entry per live session plus the
/// delayed labels and fraud. Event strings are written only when an event is
/// emitted: [`Generator::next_into`] fills a reusable [`EventBuf`] without
/// allocating; the `Iterator` impl builds fresh [`GenEvent`]s.
pub struct Generator {
    config: GeneratorConfig,
    rng: Xoshiro256PlusPlus,
    population: Population,
    /// Pending work ordered by (time, sequence): small keys in a heap,
    /// payloads in a slab whose free slots are reused.
    queue: BinaryHeap<Entry>,
    slab: Vec<Pending>,
    free: Vec<u32>,
    seq: u64,
    /// Simulated time (ms, fractional) of the next activity.
    next_arrival: f64,
    /// Mean ms between activities at the peak of the rhythm.
    peak_gap_ms: f64,
    /// Probability that an activity is a fraud episode.
    episode_p: f64,
    txn_seq: u64,
    click_seq: u64,
    session_seq: u64,
    fraudster_seq: u64,
    /// `t-<seed>-`, `k-<seed>-`, `s-<seed>-`, `d-x-<seed>-`.
    prefixes: [String; 4],
}

const TXN_PREFIX: usize = 0;
const CLICK_PREFIX: usize = 1;
const SESSION_PREFIX: usize = 2;
const DEVICE_PREFIX: usize = 3;

/// The device of a transaction.
#[derive(Debug, Clone, Copy)]
enum Device {
    None,
    /// The user's own device.
    User(u32),
    /// A fraudster's device, by number.
    Fraudster(u64),
}

/// A transaction to emit.
#[derive(Debug, Clone, Copy)]
struct TxnSpec {
    no: u64,
    amount_minor: i64,
    device: Device,
    card: u32,
    merchant: u32,
    channel: Channel,
    ip_country: Option<u8>,
    fraud: Option<FraudKind>,
}

/// A click to emit.
#[derive(Debug, Clone, Copy)]
struct ClickSpec {
    session: u64,
    user: u32,
    item: u32,
    action: ClickAction,
    dwell_ms: Option<i32>,
}

/// The next step of a browsing session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    View,
    AddToCart,
    Purchase,
}

/// A live browsing session: its next step is at the entry's time.
#[derive(Debug, Clone, Copy)]
struct Session {
    no: u64,
    user: u32,
    /// The item of the next view or add-to-cart.
    item: u32,
    /// First item put in the cart (`u32::MAX`: the cart is empty).
    first_cart: u32,
    /// Sum of the cart's prices, USD.
    cart_usd: f64,
    step: Step,
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    Txn(TxnSpec),
    Label {
        txn: u64,
        card: u32,
        fraud: Option<FraudKind>,
    },
    Click(ClickSpec),
    Session(Session),
}

/// A queue entry (24 bytes, cheap to sift); the payload is `slab[slot]`.
/// The heap is a max-heap, so the order is reversed.
#[derive(Debug, Clone, Copy)]
struct Entry {
    time: i64,
    seq: u64,
    slot: u32,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.time, other.seq).cmp(&(self.time, self.seq))
    }
}

/// An event ready to be written out (numbers and population indices only).
#[derive(Debug, Clone, Copy)]
enum Emitted {
    Txn {
        time: i64,
        spec: TxnSpec,
    },
    Click {
        time: i64,
        no: u64,
        spec: ClickSpec,
    },
    Label {
        time: i64,
        txn: u64,
        card: u32,
        fraud: Option<FraudKind>,
    },
}

/// Reusable storage for one event of each kind; [`Generator::next_into`]
/// overwrites the strings in place, so a long run allocates nothing per event.
#[derive(Debug, Clone)]
pub struct EventBuf {
    txn: GenEvent,
    click: GenEvent,
    label: GenEvent,
    /// Spare strings for optional fields that were `None` last time.
    spare: Vec<String>,
}

impl Default for EventBuf {
    fn default() -> Self {
        EventBuf {
            txn: GenEvent::Txn {
                txn: Txn {
                    event_id: String::new(),
                    card_id: String::new(),
                    user_id: String::new(),
                    merchant_id: String::new(),
                    mcc: 0,
                    amount_minor: 0,
                    currency: String::new(),
                    country: String::new(),
                    channel: Channel::Pos,
                    event_time: 0,
                    device_id: None,
                    ip_country: None,
                },
                fraud: None,
            },
            click: GenEvent::Click(Click {
                event_id: String::new(),
                user_id: String::new(),
                session_id: String::new(),
                item_id: String::new(),
                category: String::new(),
                action: ClickAction::View,
                event_time: 0,
                dwell_ms: None,
            }),
            label: GenEvent::Label(Label {
                event_id: String::new(),
                card_id: String::new(),
                is_fraud: false,
                fraud_type: None,
                label_time: 0,
            }),
            spare: Vec::new(),
        }
    }
}

fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

/// Sets `s` to an event id: `prefix` and `n`.
fn set_id(s: &mut String, prefix: &str, n: u64) {
    s.clear();
    push_id(s, prefix, n, 0);
}

/// Sets `s` to the id of population member `n` (formatted from the index:
/// no read of the population's strings, which would miss the cache).
fn set_member(s: &mut String, scheme: IdScheme, n: u32) {
    s.clear();
    push_id(s, scheme.0, u64::from(n), scheme.1);
}

/// Sets an optional string field, keeping unused allocations in `spare`.
fn set_opt(
    slot: &mut Option<String>,
    spare: &mut Vec<String>,
    value: Option<impl FnOnce(&mut String)>,
) {
    match value {
        None => {
            if let Some(s) = slot.take() {
                spare.push(s);
            }
        }
        Some(write) => {
            let s = slot.get_or_insert_with(|| spare.pop().unwrap_or_default());
            s.clear();
            write(s);
        }
    }
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("config", &self.config)
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl Generator {
    pub fn new(config: GeneratorConfig) -> Self {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
        let population = Population::build(
            &mut rng,
            config.users,
            config.cards_per_user,
            config.merchants,
            config.items,
        );
        let s = config.session_share.clamp(0.0, 1.0);
        let normal_events = s * SESSION_EVENTS + (1.0 - s);
        let normal_txns = s * SESSION_TXNS + (1.0 - s);
        // Solve episode_p * F / (normal_txns + episode_p * (F + G)) = fraud_rate,
        // with G the genuine transactions of an episode (compromised merchant).
        let f = config.fraud_rate.clamp(0.0, 0.5);
        let genuine = 0.2 * 35.0;
        let episode_p = (f * normal_txns
            / (EPISODE_FRAUD_TXNS - f * (EPISODE_FRAUD_TXNS + genuine)))
            .clamp(0.0, 1.0);
        let events_per_activity = (1.0 - episode_p) * normal_events
            + episode_p * (EPISODE_FRAUD_TXNS + EPISODE_OTHER_EVENTS);
        let activities_per_ms = config.events_per_sec.max(1e-6) / 1000.0 / events_per_activity;
        let peak_gap_ms = 1.0 / (activities_per_ms * RHYTHM_MAX);
        let seed = config.seed;
        Generator {
            next_arrival: config.start_time_ms as f64,
            config,
            rng,
            population,
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            seq: 0,
            peak_gap_ms,
            episode_p,
            txn_seq: 0,
            click_seq: 0,
            session_seq: 0,
            fraudster_seq: 0,
            prefixes: [
                format!("t-{seed}-"),
                format!("k-{seed}-"),
                format!("s-{seed}-"),
                format!("d-x-{seed}-"),
            ],
        }
    }

    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The simulated world.
    pub fn population(&self) -> &Population {
        &self.population
    }

    /// Entries waiting in the queue (about one per live session, plus
    /// delayed labels and fraud).
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, time: i64, what: Pending) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = what;
                slot
            }
            None => {
                self.slab.push(what);
                (self.slab.len() - 1) as u32
            }
        };
        self.queue.push(Entry {
            time,
            seq: self.seq,
            slot,
        });
    }

    /// Advances `next_arrival` by thinning a Poisson process at the peak rate.
    fn advance_arrival(&mut self) {
        loop {
            let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
            self.next_arrival += -u.ln() * self.peak_gap_ms;
            let hour = (self.next_arrival as i64).rem_euclid(DAY_MS) / HOUR_MS;
            if self.rng.gen::<f64>() * RHYTHM_MAX < RHYTHM[hour as usize] {
                return;
            }
        }
    }

    /// A user index skewed towards heavy users.
    fn pick_user(&mut self) -> u32 {
        let u: f64 = self.rng.gen();
        ((u * u) * self.population.users.len() as f64) as u32
    }

    fn pick_card(&mut self, user: u32) -> u32 {
        let u = &self.population.users[user as usize];
        u.first_card + self.rng.gen_range(0..u.card_count)
    }

    fn exp_ms(&mut self, mean_ms: f64) -> i64 {
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        (-u.ln() * mean_ms) as i64
    }

    fn amount(&mut self, mcc: usize, country: u8, factor: f64) -> i64 {
        let m = MCCS[mcc];
        let usd = log_normal(&mut self.rng, m.median_usd, m.sigma) * factor;
        ((usd * COUNTRIES[country as usize].scale).round() as i64).clamp(1, 900_000_000)
    }

    /// Schedules a transaction at `time` and, if it is fraud (or drawn for a
    /// negative label), its label after the label delay.
    #[allow(clippy::too_many_arguments)]
    fn txn(
        &mut self,
        time: i64,
        card: u32,
        merchant: u32,
        amount_minor: i64,
        channel: Channel,
        device: Device,
        ip_country: Option<u8>,
        fraud: Option<FraudKind>,
    ) {
        self.txn_seq += 1;
        let no = self.txn_seq;
        let labelled = match fraud {
            Some(_) => true,
            None => {
                self.config.negative_label_rate > 0.0
                    && self.rng.gen_bool(self.config.negative_label_rate.min(1.0))
            }
        };
        if labelled {
            let mean = self.config.label_delay_ms.max(0) as f64;
            let delay = (0.2 * mean) as i64 + self.exp_ms(0.8 * mean);
            self.push(
                time + delay,
                Pending::Label {
                    txn: no,
                    card,
                    fraud,
                },
            );
        }
        self.push(
            time,
            Pending::Txn(TxnSpec {
                no,
                amount_minor,
                device,
                card,
                merchant,
                channel,
                ip_country,
                fraud,
            }),
        );
    }

    fn spawn(&mut self, at: i64) {
        if self.rng.gen_bool(self.episode_p) {
            match self.rng.gen_range(0..10) {
                0..=3 => self.card_testing(at),
                4..=7 => self.account_takeover(at),
                _ => self.compromised_merchant(at),
            }
        } else if self.rng.gen_bool(self.config.session_share.clamp(0.0, 1.0)) {
            self.session(at);
        } else {
            self.card_present(at);
        }
    }

    /// A payment at a merchant in the user's country (ATM, shop, or online).
    fn card_present(&mut self, at: i64) {
        let user = self.pick_user();
        let card = self.pick_card(user);
        let country = self.population.users[user as usize].country;
        let traveling = self.rng.gen_bool(0.03);
        let merchant = if traveling {
            self.rng
                .gen_range(0..self.population.merchants.len() as u32)
        } else {
            self.population.local_merchant(&mut self.rng, country)
        };
        let m = &self.population.merchants[merchant as usize];
        let (m_mcc, m_country) = (m.mcc, m.country);
        let mcc = MCCS[m_mcc as usize];
        let channel = if mcc.code == 6011 {
            Channel::Atm
        } else if mcc.online && self.rng.gen_bool(0.6) {
            Channel::Ecom
        } else {
            Channel::Pos
        };
        let amount_country = if channel == Channel::Ecom {
            country
        } else {
            m_country
        };
        let mut amount = self.amount(m_mcc as usize, amount_country, 1.0);
        if channel == Channel::Atm {
            let step = (COUNTRIES[amount_country as usize].scale * 20.0) as i64;
            amount = ((amount / step).max(1)) * step;
        }
        let (device, ip) = match channel {
            Channel::Ecom => (Device::User(user), Some(country)),
            _ => (Device::None, None),
        };
        self.txn(at, card, merchant, amount, channel, device, ip, None);
    }

    /// A browsing session: views, add-to-carts and maybe a purchase (a click
    /// and a transaction). Only its first view is scheduled here; each step
    /// schedules the next (see [`Generator::session_step`]).
    fn session(&mut self, at: i64) {
        self.session_seq += 1;
        let user = self.pick_user();
        let item = self.rng.gen_range(0..self.population.items.len() as u32);
        self.push(
            at,
            Pending::Session(Session {
                no: self.session_seq,
                user,
                item,
                first_cart: u32::MAX,
                cart_usd: 0.0,
                step: Step::View,
            }),
        );
    }

    /// Emits the click of session step `s` at `t` and schedules the next step.
    fn session_step(&mut self, t: i64, mut s: Session) -> ClickSpec {
        let click = |s: &Session, action, dwell_ms| ClickSpec {
            session: s.no,
            user: s.user,
            item: s.item,
            action,
            dwell_ms,
        };
        match s.step {
            Step::View => {
                let dwell = 2_000 + self.exp_ms(25_000.0);
                let out = click(
                    &s,
                    ClickAction::View,
                    Some(dwell.min(i32::MAX as i64) as i32),
                );
                let mut next = t + dwell;
                if self.rng.gen_bool(CART_P) {
                    next += 500 + self.exp_ms(2_000.0);
                    s.step = Step::AddToCart;
                    self.push(next, Pending::Session(s));
                } else {
                    self.after_item(next, s);
                }
                out
            }
            Step::AddToCart => {
                let out = click(&s, ClickAction::AddToCart, None);
                if s.first_cart == u32::MAX {
                    s.first_cart = s.item;
                }
                s.cart_usd += self.population.items[s.item as usize].price_usd;
                self.after_item(t, s);
                out
            }
            Step::Purchase => {
                let first = s.first_cart;
                let out = ClickSpec {
                    item: first,
                    ..click(&s, ClickAction::Purchase, None)
                };
                let user = s.user;
                let country = self.population.users[user as usize].country;
                let amount = ((s.cart_usd * COUNTRIES[country as usize].scale).round() as i64)
                    .clamp(1, 900_000_000);
                let mcc = mcc_index(
                    CATEGORIES[self.population.items[first as usize].category as usize].1,
                );
                let merchant = self.population.online_merchant(&mut self.rng, mcc);
                let card = self.pick_card(user);
                self.txn(
                    t + 1_500,
                    card,
                    merchant,
                    amount,
                    Channel::Ecom,
                    Device::User(user),
                    Some(country),
                    None,
                );
                out
            }
        }
    }

    /// After a view (and maybe an add-to-cart) at `t`: another view, or the
    /// end of the session with maybe a purchase.
    fn after_item(&mut self, t: i64, mut s: Session) {
        if self.rng.gen_bool(VIEW_CONTINUE) {
            let category = self.population.items[s.item as usize].category as usize;
            let same = &self.population.by_category[category];
            s.item = if self.rng.gen_bool(0.6) && !same.is_empty() {
                same[self.rng.gen_range(0..same.len())]
            } else {
                self.rng.gen_range(0..self.population.items.len() as u32)
            };
            s.step = Step::View;
            self.push(t, Pending::Session(s));
            return;
        }
        if s.first_cart == u32::MAX || !self.rng.gen_bool(BUY_P) {
            return;
        }
        let next = t + 3_000 + self.exp_ms(20_000.0);
        s.step = Step::Purchase;
        self.push(next, Pending::Session(s));
    }

    fn fraudster(&mut self) -> (Device, u8) {
        self.fraudster_seq += 1;
        (
            Device::Fraudster(self.fraudster_seq),
            self.rng.gen_range(0..COUNTRIES.len() as u8),
        )
    }

    /// 8–20 tiny online charges at distinct merchants within minutes, often
    /// followed by one large cash-out.
    fn card_testing(&mut self, at: i64) {
        let user = self.pick_user();
        let card = self.pick_card(user);
        let (device, ip) = self.fraudster();
        let home = self.population.users[user as usize].country;
        let scale = COUNTRIES[home as usize].scale;
        let mut t = at;
        for _ in 0..self.rng.gen_range(8..=20) {
            let merchant = self
                .rng
                .gen_range(0..self.population.merchants.len() as u32);
            let amount = ((self.rng.gen_range(0.5..3.0) * scale).round() as i64).max(1);
            self.txn(
                t,
                card,
                merchant,
                amount,
                Channel::Ecom,
                device,
                Some(ip),
                Some(FraudKind::CardTesting),
            );
            t += 2_000 + self.exp_ms(20_000.0);
        }
        if self.rng.gen_bool(0.5) {
            let merchant = self
                .population
                .online_merchant(&mut self.rng, mcc_index(5732));
            let amount = self.amount(mcc_index(5732), home, 3.0);
            self.txn(
                t,
                card,
                merchant,
                amount,
                Channel::Ecom,
                device,
                Some(ip),
                Some(FraudKind::CardTesting),
            );
        }
    }

    /// A few browsing clicks, then 2–5 large purchases from a new country and device.
    fn account_takeover(&mut self, at: i64) {
        let user = self.pick_user();
        let home = self.population.users[user as usize].country;
        let (device, mut ip) = self.fraudster();
        if ip == home {
            ip = (ip + 1) % COUNTRIES.len() as u8;
        }
        self.session_seq += 1;
        let session = self.session_seq;
        let mut t = at;
        for _ in 0..3 {
            let electronics = self.population.by_category[0].len();
            let item = if electronics == 0 {
                0
            } else {
                self.population.by_category[0][self.rng.gen_range(0..electronics)]
            };
            self.push(
                t,
                Pending::Click(ClickSpec {
                    session,
                    user,
                    item,
                    action: ClickAction::View,
                    dwell_ms: Some(1_500),
                }),
            );
            t += 1_500 + self.exp_ms(3_000.0);
        }
        for _ in 0..self.rng.gen_range(2..=5) {
            let card = self.pick_card(user);
            let mcc = mcc_index([5732, 5944, 4511][self.rng.gen_range(0..3)]);
            let merchant = self.population.online_merchant(&mut self.rng, mcc);
            let factor = self.rng.gen_range(2.0..6.0);
            let amount = self.amount(mcc, home, factor);
            self.txn(
                t,
                card,
                merchant,
                amount,
                Channel::Ecom,
                device,
                Some(ip),
                Some(FraudKind::AccountTakeover),
            );
            t += 60_000 + self.exp_ms(15.0 * 60_000.0);
        }
    }

    /// 20–50 cards pay normally at one merchant over two hours; 40% of them
    /// are defrauded abroad 1–10 days later.
    fn compromised_merchant(&mut self, at: i64) {
        let merchant = self
            .rng
            .gen_range(0..self.population.merchants.len() as u32);
        let m = &self.population.merchants[merchant as usize];
        let (m_mcc, m_country) = (m.mcc, m.country);
        for _ in 0..self.rng.gen_range(20..=50) {
            let t = at + self.rng.gen_range(0..2 * HOUR_MS);
            let user = self.pick_user();
            let card = self.pick_card(user);
            let amount = self.amount(m_mcc as usize, m_country, 1.0);
            self.txn(
                t,
                card,
                merchant,
                amount,
                Channel::Pos,
                Device::None,
                None,
                None,
            );
            if !self.rng.gen_bool(0.4) {
                continue;
            }
            let (device, ip) = self.fraudster();
            let mut later = t + self.rng.gen_range(DAY_MS..10 * DAY_MS);
            let home = self.population.users[user as usize].country;
            for _ in 0..self.rng.gen_range(1..=3) {
                let mcc = mcc_index([5732, 5944, 7995, 5999][self.rng.gen_range(0..4)]);
                let target = self.population.online_merchant(&mut self.rng, mcc);
                let factor = self.rng.gen_range(1.5..4.0);
                let amount = self.amount(mcc, home, factor);
                self.txn(
                    later,
                    card,
                    target,
                    amount,
                    Channel::Ecom,
                    device,
                    Some(ip),
                    Some(FraudKind::CompromisedMerchant),
                );
                later += 5 * 60_000 + self.exp_ms(30.0 * 60_000.0);
            }
        }
    }

    /// Runs the simulation without producing events until the next event is
    /// at or after `until` (ms); returns how many were skipped. The state is
    /// exactly as if they had been taken with [`Generator::next_into`].
    pub fn skip_until(&mut self, until: i64) -> u64 {
        let mut skipped = 0;
        loop {
            let next = match self.queue.peek() {
                Some(head) if (head.time as f64) <= self.next_arrival => head.time,
                // The next arrival spawns activity at its own time or later.
                _ => self.next_arrival as i64,
            };
            if next >= until {
                return skipped;
            }
            self.next_emitted();
            skipped += 1;
        }
    }

    /// Moves everything still to come (pending events and arrivals) by
    /// `delta_ms` of simulated time.
    pub fn shift(&mut self, delta_ms: i64) {
        let entries = std::mem::take(&mut self.queue).into_vec();
        self.queue = entries
            .into_iter()
            .map(|e| Entry {
                time: e.time + delta_ms,
                ..e
            })
            .collect();
        self.next_arrival += delta_ms as f64;
    }

    /// The next event in compact form.
    fn next_emitted(&mut self) -> Emitted {
        loop {
            if let Some(head) = self.queue.peek() {
                if (head.time as f64) <= self.next_arrival {
                    let Entry { time, slot, .. } = self.queue.pop().expect("peeked");
                    let what = self.slab[slot as usize];
                    self.free.push(slot);
                    return match what {
                        Pending::Txn(spec) => Emitted::Txn { time, spec },
                        Pending::Label { txn, card, fraud } => Emitted::Label {
                            time,
                            txn,
                            card,
                            fraud,
                        },
                        Pending::Click(spec) => self.emit_click(time, spec),
                        Pending::Session(s) => {
                            let spec = self.session_step(time, s);
                            self.emit_click(time, spec)
                        }
                    };
                }
            }
            let at = self.next_arrival as i64;
            self.spawn(at);
            self.advance_arrival();
        }
    }

    fn emit_click(&mut self, time: i64, spec: ClickSpec) -> Emitted {
        self.click_seq += 1;
        Emitted::Click {
            time,
            no: self.click_seq,
            spec,
        }
    }

    /// The next event, written into `buf` (reusing its strings); returns it.
    pub fn next_into<'b>(&mut self, buf: &'b mut EventBuf) -> &'b GenEvent {
        let emitted = self.next_emitted();
        let EventBuf {
            txn,
            click,
            label,
            spare,
        } = buf;
        let slot = match emitted {
            Emitted::Txn { .. } => txn,
            Emitted::Click { .. } => click,
            Emitted::Label { .. } => label,
        };
        self.write(emitted, slot, spare);
        slot
    }

    /// Writes `e` into `out`, which must be of the same kind.
    fn write(&self, e: Emitted, out: &mut GenEvent, spare: &mut Vec<String>) {
        let p = &self.population;
        match (e, out) {
            (Emitted::Txn { time, spec }, GenEvent::Txn { txn, fraud }) => {
                let c = &p.cards[spec.card as usize];
                let user = &p.users[c.user as usize];
                let m = &p.merchants[spec.merchant as usize];
                let currency_country = if spec.channel == Channel::Ecom {
                    user.country
                } else {
                    m.country
                };
                set_id(&mut txn.event_id, &self.prefixes[TXN_PREFIX], spec.no);
                set_member(&mut txn.card_id, CARD_ID, spec.card);
                set_member(&mut txn.user_id, USER_ID, c.user);
                set_member(&mut txn.merchant_id, MERCHANT_ID, spec.merchant);
                txn.mcc = MCCS[m.mcc as usize].code;
                txn.amount_minor = spec.amount_minor;
                set(
                    &mut txn.currency,
                    COUNTRIES[currency_country as usize].currency,
                );
                set(&mut txn.country, COUNTRIES[m.country as usize].code);
                txn.channel = spec.channel;
                txn.event_time = time;
                let device = match spec.device {
                    Device::None => None,
                    Device::User(u) => Some(Err(u)),
                    Device::Fraudster(n) => Some(Ok(n)),
                };
                set_opt(
                    &mut txn.device_id,
                    spare,
                    device.map(|d| {
                        move |s: &mut String| match d {
                            Err(user) => push_id(s, DEVICE_ID.0, u64::from(user), DEVICE_ID.1),
                            Ok(n) => {
                                push_id(s, &self.prefixes[DEVICE_PREFIX], n, 0);
                            }
                        }
                    }),
                );
                set_opt(
                    &mut txn.ip_country,
                    spare,
                    spec.ip_country
                        .map(|i| move |s: &mut String| s.push_str(COUNTRIES[i as usize].code)),
                );
                *fraud = spec.fraud;
            }
            (Emitted::Click { time, no, spec }, GenEvent::Click(click)) => {
                let it = &p.items[spec.item as usize];
                set_id(&mut click.event_id, &self.prefixes[CLICK_PREFIX], no);
                set_member(&mut click.user_id, USER_ID, spec.user);
                set_id(
                    &mut click.session_id,
                    &self.prefixes[SESSION_PREFIX],
                    spec.session,
                );
                set_member(&mut click.item_id, ITEM_ID, spec.item);
                set(&mut click.category, CATEGORIES[it.category as usize].0);
                click.action = spec.action;
                click.event_time = time;
                click.dwell_ms = spec.dwell_ms;
            }
            (
                Emitted::Label {
                    time,
                    txn,
                    card,
                    fraud,
                },
                GenEvent::Label(label),
            ) => {
                set_id(&mut label.event_id, &self.prefixes[TXN_PREFIX], txn);
                set_member(&mut label.card_id, CARD_ID, card);
                label.is_fraud = fraud.is_some();
                set_opt(
                    &mut label.fraud_type,
                    spare,
                    fraud.map(|f| move |s: &mut String| s.push_str(f.as_str())),
                );
                label.label_time = time;
            }
            _ => unreachable!("the slot matches the event kind"),
        }
    }
}

impl Iterator for Generator {
    type Item = GenEvent;

    fn next(&mut self) -> Option<GenEvent> {
        let emitted = self.next_emitted();
        let buf = EventBuf::default();
        let mut event = match emitted {
            Emitted::Txn { .. } => buf.txn,
            Emitted::Click { .. } => buf.click,
            Emitted::Label { .. } => buf.label,
        };
        self.write(emitted, &mut event, &mut Vec::new());
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(g: &mut Generator, n: usize) -> Vec<(i64, String)> {
        let mut buf = EventBuf::default();
        (0..n)
            .map(|_| {
                let e = g.next_into(&mut buf);
                (e.time_ms(), e.key().to_owned())
            })
            .collect()
    }

    #[test]
    fn skipping_then_shifting_continues_the_same_simulation() {
        let config = GeneratorConfig::default();
        let until = config.start_time_ms + 60_000;
        let mut plain = Generator::new(config.clone());
        let mut all = times(&mut plain, 20_000);
        all.retain(|(t, _)| *t >= until);
        let mut skipping = Generator::new(config);
        assert!(skipping.skip_until(until) > 0);
        skipping.shift(1_234);
        let after = times(&mut skipping, all.len());
        let expected: Vec<_> = all.iter().map(|(t, k)| (t + 1_234, k.clone())).collect();
        assert_eq!(after, expected);
    }
}
