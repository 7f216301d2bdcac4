//! Parsing and validating the JSON bodies of the scoring routes. Every error
//! names the field it is about.

use schemas::Channel;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Longest accepted entity id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Largest accepted amount, in minor units (10^12 = ten billion major units).
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// `POST /score/fraud`.
#[derive(Debug, Clone, PartialEq)]
pub struct FraudRequest {
    pub card_id: String,
    pub user_id: Option<String>,
    /// From `amount_minor`, or `transaction_amount` (major units) x 100, rounded.
    pub amount_minor: i64,
    pub merchant_id: Option<String>,
    pub mcc: Option<i32>,
    /// ISO 3166 alpha-2, upper case.
    pub country: Option<String>,
    pub channel: Option<Channel>,
    /// When the transaction happened (ms since the epoch); default now.
    pub event_time_ms: Option<i64>,
}

/// `POST /score/propensity`.
#[derive(Debug, Clone, PartialEq)]
pub struct PropensityRequest {
    pub user_id: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> ApiError {
    ApiError::BadField {
        field,
        problem: problem.into(),
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadJson("the body must be a JSON object".into())),
        Err(e) => Err(ApiError::BadJson(e.to_string())),
    }
}

/// A present, non-null field.
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).filter(|v| !v.is_null())
}

/// Validates an entity id: a non-empty string of printable non-space ASCII.
pub fn check_id(field: &'static str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(bad(field, "must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(bad(field, format!("must be at most {MAX_ID_BYTES} bytes")));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(field, "must be printable ASCII without spaces"));
    }
    Ok(())
}

fn id(map: &Map<String, Value>, name: &'static str) -> Result<Option<String>, ApiError> {
    match field(map, name) {
        None => Ok(None),
        Some(Value::String(s)) => check_id(name, s).map(|()| Some(s.clone())),
        Some(_) => Err(bad(name, "must be a string")),
    }
}

fn int(
    map: &Map<String, Value>,
    name: &'static str,
    lo: i64,
    hi: i64,
) -> Result<Option<i64>, ApiError> {
    match field(map, name) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(i) if (lo..=hi).contains(&i) => Ok(Some(i)),
            Some(_) => Err(bad(name, format!("must be between {lo} and {hi}"))),
            None => Err(bad(name, "must be an integer")),
        },
    }
}

fn amount_minor(map: &Map<String, Value>) -> Result<i64, ApiError> {
    let minor = int(map, "amount_minor", 0, MAX_AMOUNT_MINOR)?;
    let major = match field(map, "transaction_amount") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 && x * 100.0 <= MAX_AMOUNT_MINOR as f64 => {
                Some((x * 100.0).round() as i64)
            }
            Some(_) => {
                return Err(bad(
                    "transaction_amount",
                    format!("must be between 0 and {}", MAX_AMOUNT_MINOR / 100),
                ))
            }
            None => return Err(bad("transaction_amount", "must be a number")),
        },
    };
    match (major, minor) {
        (Some(_), Some(_)) => Err(bad(
            "transaction_amount",
            "conflicts with amount_minor: give one of them",
        )),
        (Some(v), None) | (None, Some(v)) => Ok(v),
        (None, None) => Err(ApiError::MissingField("transaction_amount")),
    }
}

impl FraudRequest {
    pub fn parse(body: &[u8]) -> Result<FraudRequest, ApiError> {
        let map = object(body)?;
        let card_id = id(&map, "card_id")?.ok_or(ApiError::MissingField("card_id"))?;
        let user_id = id(&map, "user_id")?;
        let amount_minor = amount_minor(&map)?;
        let merchant_id = id(&map, "merchant_id")?;
        let mcc = int(&map, "mcc", 0, 9999)?.map(|m| m as i32);
        let country = match field(&map, "country") {
            None => None,
            Some(Value::String(s))
                if s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic()) =>
            {
                Some(s.to_ascii_uppercase())
            }
            Some(_) => {
                return Err(bad(
                    "country",
                    "must be an ISO 3166 alpha-2 code such as \"DE\"",
                ))
            }
        };
        let channel = match field(&map, "channel") {
            None => None,
            Some(Value::String(s)) => Some(match s.to_ascii_lowercase().as_str() {
                "pos" => Channel::Pos,
                "ecom" => Channel::Ecom,
                "atm" => Channel::Atm,
                _ => return Err(bad("channel", "must be one of pos, ecom, atm")),
            }),
            Some(_) => return Err(bad("channel", "must be one of pos, ecom, atm")),
        };
        let event_time_ms = int(&map, "event_time_ms", 1, i64::MAX)?;
        Ok(FraudRequest {
            card_id,
            user_id,
            amount_minor,
            merchant_id,
            mcc,
            country,
            channel,
            event_time_ms,
        })
    }
}

impl PropensityRequest {
    pub fn parse(body: &[u8]) -> Result<PropensityRequest, ApiError> {
        let map = object(body)?;
        let user_id = id(&map, "user_id")?.ok_or(ApiError::MissingField("user_id"))?;
        Ok(PropensityRequest { user_id })
    }
}

/// The header carrying the request id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id honoured from a client, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// Request ids: a client's `x-request-id` when it is short and printable
/// (1..=64 visible ASCII characters), else `{process prefix}-{counter}`,
/// the prefix random per process.
#[derive(Debug)]
pub struct RequestIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

impl RequestIds {
    pub fn new() -> RequestIds {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        RequestIds {
            prefix: format!("{:012x}", h.finish() >> 16),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The id of a request whose `x-request-id` header is `header`.
    pub fn of(&self, header: Option<&hyper::header::HeaderValue>) -> String {
        if let Some(id) = header.map(|v| v.as_bytes()).filter(|b| valid_request_id(b)) {
            // Visible ASCII only, so this is UTF-8.
            return String::from_utf8_lossy(id).into_owned();
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix)
    }
}

/// Whether a client's request id is honoured: 1..=64 visible ASCII characters.
pub fn valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> Option<&'static str> {
        FraudRequest::parse(body.as_bytes()).unwrap_err().field()
    }

    #[test]
    fn parses_a_full_request() {
        let r = FraudRequest::parse(
            br#"{"card_id":"c1","user_id":"u1","transaction_amount":12.345,"merchant_id":"m","mcc":5411,
                "country":"de","channel":"ECOM","extra":1}"#,
        )
        .unwrap();
        assert_eq!(r.amount_minor, 1235);
        assert_eq!(r.country.as_deref(), Some("DE"));
        assert_eq!(r.channel, Some(Channel::Ecom));
        assert_eq!(r.mcc, Some(5411));
        let r =
            FraudRequest::parse(br#"{"card_id":"c1","amount_minor":99,"user_id":null}"#).unwrap();
        assert_eq!((r.amount_minor, r.user_id), (99, None));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"amount_minor":1}"#), Some("card_id"));
        assert_eq!(
            field_of(r#"{"card_id":7,"amount_minor":1}"#),
            Some("card_id")
        );
        assert_eq!(
            field_of(r#"{"card_id":"","amount_minor":1}"#),
            Some("card_id")
        );
        assert_eq!(field_of(r#"{"card_id":"c"}"#), Some("transaction_amount"));
        assert_eq!(
            field_of(r#"{"card_id":"c","transaction_amount":"12"}"#),
            Some("transaction_amount")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","transaction_amount":-1}"#),
            Some("transaction_amount")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","amount_minor":1.5}"#),
            Some("amount_minor")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","amount_minor":1,"transaction_amount":1}"#),
            Some("transaction_amount")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","amount_minor":1,"mcc":"5411"}"#),
            Some("mcc")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","amount_minor":1,"country":"DEU"}"#),
            Some("country")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","amount_minor":1,"channel":"phone"}"#),
            Some("channel")
        );
        assert_eq!(
            field_of(r#"{"card_id":"c","amount_minor":1,"user_id":["u"]}"#),
            Some("user_id")
        );
        assert!(matches!(
            FraudRequest::parse(b"{"),
            Err(ApiError::BadJson(_))
        ));
        assert!(matches!(
            FraudRequest::parse(b"[1]"),
            Err(ApiError::BadJson(_))
        ));
        assert_eq!(
            PropensityRequest::parse(b"{}").unwrap_err(),
            ApiError::MissingField("user_id")
        );
    }

    #[test]
    fn request_ids_honour_short_printable_ones_and_make_the_rest() {
        use hyper::header::HeaderValue;
        let ids = RequestIds::new();
        let given = HeaderValue::from_static("abc-123_X");
        assert_eq!(ids.of(Some(&given)), "abc-123_X");
        let (a, b) = (ids.of(None), ids.of(None));
        assert_ne!(a, b);
        assert!(valid_request_id(a.as_bytes()), "{a}");
        for bad in ["", "has space", &"x".repeat(65)] {
            let made = ids.of(Some(&HeaderValue::from_str(bad).unwrap()));
            assert_ne!(made, bad);
            assert!(made.starts_with(a.split('-').next().unwrap()), "{made}");
        }
        assert_eq!(
            ids.of(Some(&HeaderValue::from_str(&"y".repeat(64)).unwrap()))
                .len(),
            64
        );
    }
}
