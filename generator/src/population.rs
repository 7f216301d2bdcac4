//! The simulated world: users with home countries and devices, their cards,
//! merchants with a category code and a country, and a catalogue of items.

use rand::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;

/// A country with its currency, how many minor units make one major unit in
/// practice for amounts (JPY has no minor unit), a price level relative to
/// USD, and a population weight.
#[derive(Debug, Clone, Copy)]
pub struct Country {
    pub code: &'static str,
    pub currency: &'static str,
    /// Minor units per "typical USD" of spend (price level × minor units).
    pub scale: f64,
    pub weight: u32,
}

pub const COUNTRIES: &[Country] = &[
    Country {
        code: "US",
        currency: "USD",
        scale: 100.0,
        weight: 30,
    },
    Country {
        code: "GB",
        currency: "GBP",
        scale: 80.0,
        weight: 10,
    },
    Country {
        code: "DE",
        currency: "EUR",
        scale: 92.0,
        weight: 10,
    },
    Country {
        code: "FR",
        currency: "EUR",
        scale: 92.0,
        weight: 9,
    },
    Country {
        code: "ES",
        currency: "EUR",
        scale: 92.0,
        weight: 6,
    },
    Country {
        code: "IT",
        currency: "EUR",
        scale: 92.0,
        weight: 6,
    },
    Country {
        code: "NL",
        currency: "EUR",
        scale: 92.0,
        weight: 4,
    },
    Country {
        code: "CA",
        currency: "CAD",
        scale: 135.0,
        weight: 6,
    },
    Country {
        code: "AU",
        currency: "AUD",
        scale: 150.0,
        weight: 4,
    },
    Country {
        code: "JP",
        currency: "JPY",
        scale: 1.5,
        weight: 6,
    },
    Country {
        code: "BR",
        currency: "BRL",
        scale: 500.0,
        weight: 5,
    },
    Country {
        code: "IN",
        currency: "INR",
        scale: 8300.0,
        weight: 4,
    },
];

/// A merchant category: ISO 18245 code, log-normal amount parameters in
/// USD (`median`, `sigma` of the log), share of merchants, and whether
/// payments there are mostly online.
#[derive(Debug, Clone, Copy)]
pub struct Mcc {
    pub code: i32,
    pub median_usd: f64,
    pub sigma: f64,
    pub weight: u32,
    pub online: bool,
}

pub const MCCS: &[Mcc] = &[
    Mcc {
        code: 5411,
        median_usd: 40.0,
        sigma: 0.6,
        weight: 14,
        online: false,
    }, // grocery
    Mcc {
        code: 5812,
        median_usd: 35.0,
        sigma: 0.5,
        weight: 12,
        online: false,
    }, // restaurants
    Mcc {
        code: 5814,
        median_usd: 12.0,
        sigma: 0.4,
        weight: 12,
        online: false,
    }, // fast food
    Mcc {
        code: 5541,
        median_usd: 50.0,
        sigma: 0.3,
        weight: 8,
        online: false,
    }, // fuel
    Mcc {
        code: 5912,
        median_usd: 25.0,
        sigma: 0.6,
        weight: 6,
        online: false,
    }, // pharmacy
    Mcc {
        code: 4111,
        median_usd: 5.0,
        sigma: 0.5,
        weight: 6,
        online: false,
    }, // transit
    Mcc {
        code: 6011,
        median_usd: 100.0,
        sigma: 0.5,
        weight: 4,
        online: false,
    }, // ATM
    Mcc {
        code: 5311,
        median_usd: 80.0,
        sigma: 0.8,
        weight: 6,
        online: true,
    }, // department stores
    Mcc {
        code: 5732,
        median_usd: 250.0,
        sigma: 0.9,
        weight: 5,
        online: true,
    }, // electronics
    Mcc {
        code: 5651,
        median_usd: 70.0,
        sigma: 0.7,
        weight: 6,
        online: true,
    }, // clothing
    Mcc {
        code: 5942,
        median_usd: 20.0,
        sigma: 0.5,
        weight: 4,
        online: true,
    }, // books
    Mcc {
        code: 5999,
        median_usd: 30.0,
        sigma: 0.9,
        weight: 6,
        online: true,
    }, // misc retail
    Mcc {
        code: 4511,
        median_usd: 400.0,
        sigma: 0.6,
        weight: 2,
        online: true,
    }, // airlines
    Mcc {
        code: 7011,
        median_usd: 200.0,
        sigma: 0.6,
        weight: 3,
        online: true,
    }, // hotels
    Mcc {
        code: 5944,
        median_usd: 300.0,
        sigma: 1.0,
        weight: 2,
        online: true,
    }, // jewelry
    Mcc {
        code: 7995,
        median_usd: 50.0,
        sigma: 1.2,
        weight: 2,
        online: true,
    }, // gambling
];

/// Item categories of the catalogue, each with the MCC its purchases book under.
pub const CATEGORIES: &[(&str, i32)] = &[
    ("electronics", 5732),
    ("books", 5942),
    ("fashion", 5651),
    ("home", 5311),
    ("beauty", 5999),
    ("sports", 5999),
    ("toys", 5311),
    ("jewelry", 5944),
    ("travel", 4511),
    ("music", 5942),
];

/// An id scheme: a prefix and a zero-padded index (`u-0000042`).
pub type IdScheme = (&'static str, usize);
pub const USER_ID: IdScheme = ("u-", 7);
pub const CARD_ID: IdScheme = ("c-", 7);
pub const DEVICE_ID: IdScheme = ("d-", 7);
pub const MERCHANT_ID: IdScheme = ("m-", 6);
pub const ITEM_ID: IdScheme = ("i-", 6);

/// Appends `prefix`, then the decimal digits of `n` left-padded with zeros
/// to `width` (as `format!("{prefix}{n:0width$}")`, without the formatter).
pub fn push_id(s: &mut String, prefix: &str, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut rest = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let start = i.min(digits.len().saturating_sub(width));
    s.push_str(prefix);
    s.push_str(std::str::from_utf8(&digits[start..]).expect("ascii digits"));
}

/// The id of index `n` under `scheme`.
pub fn id_of(scheme: IdScheme, n: u32) -> String {
    let mut s = String::with_capacity(scheme.0.len() + scheme.1);
    push_id(&mut s, scheme.0, u64::from(n), scheme.1);
    s
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub country: u8,
    pub device: String,
    /// Indices into `Population::cards`.
    pub first_card: u32,
    pub card_count: u32,
}

#[derive(Debug, Clone)]
pub struct Card {
    pub id: String,
    pub user: u32,
}

#[derive(Debug, Clone)]
pub struct Merchant {
    pub id: String,
    pub mcc: u8,
    pub country: u8,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub category: u8,
    /// Price in USD.
    pub price_usd: f64,
}

/// Everything the simulation draws from, built from the seed.
#[derive(Debug, Clone)]
pub struct Population {
    pub users: Vec<User>,
    pub cards: Vec<Card>,
    pub merchants: Vec<Merchant>,
    pub items: Vec<Item>,
    /// Merchant indices per (country, mcc), for local spending.
    pub local: Vec<Vec<Vec<u32>>>,
    /// Online merchant indices per MCC index.
    pub online: Vec<Vec<u32>>,
    /// Item indices per category.
    pub by_category: Vec<Vec<u32>>,
}

/// Draws an index with probability proportional to `weight`.
pub fn weighted<T>(rng: &mut Xoshiro256PlusPlus, items: &[T], weight: impl Fn(&T) -> u32) -> usize {
    let total: u32 = items.iter().map(&weight).sum();
    let mut pick = rng.gen_range(0..total);
    for (i, item) in items.iter().enumerate() {
        let w = weight(item);
        if pick < w {
            return i;
        }
        pick -= w;
    }
    items.len() - 1
}

/// A standard normal draw (Box-Muller), so the stream depends on this crate only.
pub fn normal(rng: &mut Xoshiro256PlusPlus) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal draw with the given median and log-sigma.
pub fn log_normal(rng: &mut Xoshiro256PlusPlus, median: f64, sigma: f64) -> f64 {
    median * (sigma * normal(rng)).exp()
}

impl Population {
    /// Builds `users` users with on average `cards_per_user` cards (at least
    /// one each), `merchants` merchants and `items` catalogue items.
    pub fn build(
        rng: &mut Xoshiro256PlusPlus,
        users: u32,
        cards_per_user: f64,
        merchants: u32,
        items: u32,
    ) -> Self {
        let (users_n, merchants_n, items_n) = (users.max(1), merchants.max(1), items.max(1));
        let extra = (cards_per_user - 1.0).max(0.0);
        let mut p = Population {
            users: Vec::with_capacity(users_n as usize),
            cards: Vec::new(),
            merchants: Vec::with_capacity(merchants_n as usize),
            items: Vec::with_capacity(items_n as usize),
            local: vec![vec![Vec::new(); MCCS.len()]; COUNTRIES.len()],
            online: vec![Vec::new(); MCCS.len()],
            by_category: vec![Vec::new(); CATEGORIES.len()],
        };
        for u in 0..users_n {
            let country = weighted(rng, COUNTRIES, |c| c.weight) as u8;
            // 1 + a geometric number of extra cards with mean `extra`.
            let mut count = 1;
            while count < 8 && rng.gen_bool(extra / (1.0 + extra)) {
                count += 1;
            }
            let first_card = p.cards.len() as u32;
            for _ in 0..count {
                p.cards.push(Card {
                    id: id_of(CARD_ID, p.cards.len() as u32),
                    user: u,
                });
            }
            p.users.push(User {
                id: id_of(USER_ID, u),
                country,
                device: id_of(DEVICE_ID, u),
                first_card,
                card_count: count,
            });
        }
        for m in 0..merchants_n {
            let mcc = weighted(rng, MCCS, |m| m.weight) as u8;
            let country = weighted(rng, COUNTRIES, |c| c.weight) as u8;
            p.local[country as usize][mcc as usize].push(m);
            if MCCS[mcc as usize].online {
                p.online[mcc as usize].push(m);
            }
            p.merchants.push(Merchant {
                id: id_of(MERCHANT_ID, m),
                mcc,
                country,
            });
        }
        for i in 0..items_n {
            let category = rng.gen_range(0..CATEGORIES.len()) as u8;
            let mcc = mcc_index(CATEGORIES[category as usize].1);
            let price_usd = log_normal(rng, MCCS[mcc].median_usd, MCCS[mcc].sigma * 0.8);
            p.by_category[category as usize].push(i);
            p.items.push(Item {
                id: id_of(ITEM_ID, i),
                category,
                price_usd,
            });
        }
        p
    }

    /// An online merchant selling `mcc` (index), or any merchant if none does.
    pub fn online_merchant(&self, rng: &mut Xoshiro256PlusPlus, mcc: usize) -> u32 {
        let list = &self.online[mcc];
        if list.is_empty() {
            rng.gen_range(0..self.merchants.len() as u32)
        } else {
            list[rng.gen_range(0..list.len())]
        }
    }

    /// A merchant in `country`, of a category drawn by weight, falling back
    /// to any merchant.
    pub fn local_merchant(&self, rng: &mut Xoshiro256PlusPlus, country: u8) -> u32 {
        let mcc = weighted(rng, MCCS, |m| m.weight);
        let list = &self.local[country as usize][mcc];
        if list.is_empty() {
            rng.gen_range(0..self.merchants.len() as u32)
        } else {
            list[rng.gen_range(0..list.len())]
        }
    }
}

/// The index of `code` in `MCCS`.
pub fn mcc_index(code: i32) -> usize {
    MCCS.iter()
        .position(|m| m.code == code)
        .expect("categories map to listed MCCs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_formatter() {
        for n in [
            0u32,
            7,
            42,
            999_999,
            1_000_000,
            9_999_999,
            12_345_678,
            u32::MAX,
        ] {
            assert_eq!(id_of(USER_ID, n), format!("u-{n:07}"));
            assert_eq!(id_of(MERCHANT_ID, n), format!("m-{n:06}"));
            let mut s = String::new();
            push_id(&mut s, "t-1-", u64::from(n) * 1_000, 0);
            assert_eq!(s, format!("t-1-{}", u64::from(n) * 1_000));
        }
    }
}
