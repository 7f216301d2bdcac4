//! The simulation: activities arrive as a Poisson process whose rate follows
//! a daily rhythm; each schedules its events into a queue ordered by event
//! time, from which the iterator yields. The output is therefore in
//! non-decreasing event-time order and a pure function of the config.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use schemas::{Channel, Click, ClickAction, EventKind, Label, Txn};

use crate::population::{log_normal, mcc_index, Population, CATEGORIES, COUNTRIES, MCCS};

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
pub struct Generator {
    config: GeneratorConfig,
    rng: Xoshiro256PlusPlus,
    population: Population,
    /// Pending events by (time, sequence): a B-tree stays cache-friendly with
    /// hundreds of thousands of scheduled session events.
    queue: BTreeMap<(i64, u64), GenEvent>,
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
        Generator {
            next_arrival: config.start_time_ms as f64,
            config,
            rng,
            population,
            queue: BTreeMap::new(),
            seq: 0,
            peak_gap_ms,
            episode_p,
            txn_seq: 0,
            click_seq: 0,
            session_seq: 0,
            fraudster_seq: 0,
        }
    }

    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The simulated world.
    pub fn population(&self) -> &Population {
        &self.population
    }

    fn push(&mut self, event: GenEvent) {
        self.seq += 1;
        self.queue.insert((event.time_ms(), self.seq), event);
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

    #[allow(clippy::too_many_arguments)]
    fn txn(
        &mut self,
        time: i64,
        card: u32,
        merchant: u32,
        amount_minor: i64,
        channel: Channel,
        device: Option<String>,
        ip_country: Option<u8>,
        fraud: Option<FraudKind>,
    ) {
        self.txn_seq += 1;
        let c = &self.population.cards[card as usize];
        let user = &self.population.users[c.user as usize];
        let m = &self.population.merchants[merchant as usize];
        let currency_country = if channel == Channel::Ecom {
            user.country
        } else {
            m.country
        };
        let txn = Txn {
            event_id: format!("t-{}-{}", self.config.seed, self.txn_seq),
            card_id: c.id.clone(),
            user_id: user.id.clone(),
            merchant_id: m.id.clone(),
            mcc: MCCS[m.mcc as usize].code,
            amount_minor,
            currency: COUNTRIES[currency_country as usize].currency.to_owned(),
            country: COUNTRIES[m.country as usize].code.to_owned(),
            channel,
            event_time: time,
            device_id: device,
            ip_country: ip_country.map(|i| COUNTRIES[i as usize].code.to_owned()),
        };
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
            self.push(GenEvent::Label(Label {
                event_id: txn.event_id.clone(),
                card_id: txn.card_id.clone(),
                is_fraud: fraud.is_some(),
                fraud_type: fraud.map(|f| f.as_str().to_owned()),
                label_time: time + delay,
            }));
        }
        self.push(GenEvent::Txn { txn, fraud });
    }

    fn click(
        &mut self,
        time: i64,
        user: u32,
        session: &str,
        item: u32,
        action: ClickAction,
        dwell_ms: Option<i32>,
    ) {
        self.click_seq += 1;
        let it = &self.population.items[item as usize];
        let click = Click {
            event_id: format!("k-{}-{}", self.config.seed, self.click_seq),
            user_id: self.population.users[user as usize].id.clone(),
            session_id: session.to_owned(),
            item_id: it.id.clone(),
            category: CATEGORIES[it.category as usize].0.to_owned(),
            action,
            event_time: time,
            dwell_ms,
        };
        self.push(GenEvent::Click(click));
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
        let m = self.population.merchants[merchant as usize].clone();
        let mcc = MCCS[m.mcc as usize];
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
            m.country
        };
        let mut amount = self.amount(m.mcc as usize, amount_country, 1.0);
        if channel == Channel::Atm {
            let step = (COUNTRIES[amount_country as usize].scale * 20.0) as i64;
            amount = ((amount / step).max(1)) * step;
        }
        let (device, ip) = match channel {
            Channel::Ecom => (
                Some(self.population.users[user as usize].device.clone()),
                Some(country),
            ),
            _ => (None, None),
        };
        self.txn(at, card, merchant, amount, channel, device, ip, None);
    }

    /// Views, add-to-carts and maybe a purchase (a click and a transaction).
    fn session(&mut self, at: i64) {
        self.session_seq += 1;
        let session = format!("s-{}-{}", self.config.seed, self.session_seq);
        let user = self.pick_user();
        let mut t = at;
        let mut item = self.rng.gen_range(0..self.population.items.len() as u32);
        let mut cart: Vec<u32> = Vec::new();
        loop {
            let dwell = 2_000 + self.exp_ms(25_000.0);
            self.click(
                t,
                user,
                &session,
                item,
                ClickAction::View,
                Some(dwell.min(i32::MAX as i64) as i32),
            );
            t += dwell;
            if self.rng.gen_bool(CART_P) {
                t += 500 + self.exp_ms(2_000.0);
                self.click(t, user, &session, item, ClickAction::AddToCart, None);
                cart.push(item);
            }
            if !self.rng.gen_bool(VIEW_CONTINUE) {
                break;
            }
            let category = self.population.items[item as usize].category as usize;
            let same = &self.population.by_category[category];
            item = if self.rng.gen_bool(0.6) && !same.is_empty() {
                same[self.rng.gen_range(0..same.len())]
            } else {
                self.rng.gen_range(0..self.population.items.len() as u32)
            };
        }
        if cart.is_empty() || !self.rng.gen_bool(BUY_P) {
            return;
        }
        t += 3_000 + self.exp_ms(20_000.0);
        let first = cart[0];
        self.click(t, user, &session, first, ClickAction::Purchase, None);
        let country = self.population.users[user as usize].country;
        let usd: f64 = cart
            .iter()
            .map(|i| self.population.items[*i as usize].price_usd)
            .sum();
        let amount =
            ((usd * COUNTRIES[country as usize].scale).round() as i64).clamp(1, 900_000_000);
        let mcc = mcc_index(CATEGORIES[self.population.items[first as usize].category as usize].1);
        let merchant = self.population.online_merchant(&mut self.rng, mcc);
        let card = self.pick_card(user);
        let device = Some(self.population.users[user as usize].device.clone());
        self.txn(
            t + 1_500,
            card,
            merchant,
            amount,
            Channel::Ecom,
            device,
            Some(country),
            None,
        );
    }

    fn fraudster(&mut self) -> (String, u8) {
        self.fraudster_seq += 1;
        let device = format!("d-x-{}-{}", self.config.seed, self.fraudster_seq);
        (device, self.rng.gen_range(0..COUNTRIES.len() as u8))
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
                Some(device.clone()),
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
                Some(device),
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
        let session = format!("s-{}-{}", self.config.seed, self.session_seq);
        let mut t = at;
        for _ in 0..3 {
            let electronics = self.population.by_category[0].len();
            let item = if electronics == 0 {
                0
            } else {
                self.population.by_category[0][self.rng.gen_range(0..electronics)]
            };
            self.click(t, user, &session, item, ClickAction::View, Some(1_500));
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
                Some(device.clone()),
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
        let m = self.population.merchants[merchant as usize].clone();
        for _ in 0..self.rng.gen_range(20..=50) {
            let t = at + self.rng.gen_range(0..2 * HOUR_MS);
            let user = self.pick_user();
            let card = self.pick_card(user);
            let amount = self.amount(m.mcc as usize, m.country, 1.0);
            self.txn(t, card, merchant, amount, Channel::Pos, None, None, None);
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
                    Some(device.clone()),
                    Some(ip),
                    Some(FraudKind::CompromisedMerchant),
                );
                later += 5 * 60_000 + self.exp_ms(30.0 * 60_000.0);
            }
        }
    }
}

impl Iterator for Generator {
    type Item = GenEvent;

    fn next(&mut self) -> Option<GenEvent> {
        loop {
            if let Some(entry) = self.queue.first_entry() {
                if (entry.key().0 as f64) <= self.next_arrival {
                    return Some(entry.remove());
                }
            }
            let at = self.next_arrival as i64;
            self.spawn(at);
            self.advance_arrival();
        }
    }
}
