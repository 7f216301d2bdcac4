//! The slow path: a writer schema that is not one of the shipped versions
//! (for example a newer version registered by another producer) is decoded
//! with apache-avro and resolved to the reader's shipped schema.

use apache_avro::types::Value;
use apache_avro::Schema;

use super::binary::AvroError;
use crate::event::{Channel, Click, ClickAction, Label, Txn};

/// Decodes one datum written with `writer` and resolves it to `reader`.
pub(crate) fn decode(writer: &Schema, reader: &Schema, bytes: &[u8]) -> Result<Fields, AvroError> {
    let mut cursor = bytes;
    let value = apache_avro::from_avro_datum(writer, &mut cursor, Some(reader)).map_err(|e| {
        let text = e.to_string();
        if text.contains("failed to fill whole buffer") || text.contains("UnexpectedEof") {
            AvroError::Truncated
        } else {
            AvroError::Other(text.into_boxed_str())
        }
    })?;
    if !cursor.is_empty() {
        return Err(AvroError::TrailingBytes(cursor.len()));
    }
    match value {
        Value::Record(fields) => Ok(Fields(fields)),
        other => Err(AvroError::Other(
            format!("expected a record, got {other:?}").into(),
        )),
    }
}

/// The fields of a resolved record.
pub struct Fields(Vec<(String, Value)>);

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn as_int(v: Value) -> Option<i32> {
    match v {
        Value::Int(i) => Some(i),
        _ => None,
    }
}

fn wrong(name: &str) -> AvroError {
    AvroError::Other(format!("field {name} has an unexpected type").into())
}

impl Fields {
    fn take(&mut self, name: &str) -> Option<Value> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(std::mem::replace(&mut self.0[i].1, Value::Null))
    }

    fn get(&mut self, name: &str) -> Result<Value, AvroError> {
        match self.take(name) {
            Some(Value::Union(_, inner)) => Ok(*inner),
            Some(v) => Ok(v),
            None => Err(AvroError::Other(format!("missing field {name}").into())),
        }
    }

    fn string(&mut self, name: &str) -> Result<String, AvroError> {
        match self.get(name)? {
            Value::String(s) => Ok(s),
            _ => Err(wrong(name)),
        }
    }

    fn long(&mut self, name: &str) -> Result<i64, AvroError> {
        match self.get(name)? {
            Value::Long(v) | Value::TimestampMillis(v) => Ok(v),
            Value::Int(v) => Ok(i64::from(v)),
            _ => Err(wrong(name)),
        }
    }

    fn int(&mut self, name: &str) -> Result<i32, AvroError> {
        match self.get(name)? {
            Value::Int(v) => Ok(v),
            _ => Err(wrong(name)),
        }
    }

    fn symbol(&mut self, name: &str) -> Result<String, AvroError> {
        match self.get(name)? {
            Value::Enum(_, s) => Ok(s),
            _ => Err(wrong(name)),
        }
    }

    /// An optional field: absent from the reader schema or null is `None`.
    fn opt<T>(&mut self, name: &str, f: fn(Value) -> Option<T>) -> Result<Option<T>, AvroError> {
        let value = match self.take(name) {
            Some(Value::Union(_, inner)) => *inner,
            Some(v) => v,
            None => return Ok(None),
        };
        match value {
            Value::Null => Ok(None),
            v => f(v).map(Some).ok_or_else(|| wrong(name)),
        }
    }

    pub(crate) fn txn(mut self) -> Result<Txn, AvroError> {
        let channel = match self.symbol("channel")?.as_str() {
            "pos" => Channel::Pos,
            "ecom" => Channel::Ecom,
            "atm" => Channel::Atm,
            _ => return Err(wrong("channel")),
        };
        Ok(Txn {
            event_id: self.string("event_id")?,
            card_id: self.string("card_id")?,
            user_id: self.string("user_id")?,
            merchant_id: self.string("merchant_id")?,
            mcc: self.int("mcc")?,
            amount_minor: self.long("amount_minor")?,
            currency: self.string("currency")?,
            country: self.string("country")?,
            channel,
            event_time: self.long("event_time")?,
            device_id: self.opt("device_id", as_string)?,
            ip_country: self.opt("ip_country", as_string)?,
        })
    }

    pub(crate) fn click(mut self) -> Result<Click, AvroError> {
        let action = match self.symbol("action")?.as_str() {
            "view" => ClickAction::View,
            "add_to_cart" => ClickAction::AddToCart,
            "purchase" => ClickAction::Purchase,
            _ => return Err(wrong("action")),
        };
        Ok(Click {
            event_id: self.string("event_id")?,
            user_id: self.string("user_id")?,
            session_id: self.string("session_id")?,
            item_id: self.string("item_id")?,
            category: self.string("category")?,
            action,
            event_time: self.long("event_time")?,
            dwell_ms: self.opt("dwell_ms", as_int)?,
        })
    }

    pub(crate) fn label(mut self) -> Result<Label, AvroError> {
        Ok(Label {
            event_id: self.string("event_id")?,
            card_id: self.string("card_id")?,
            is_fraud: match self.get("is_fraud")? {
                Value::Boolean(b) => b,
                _ => return Err(wrong("is_fraud")),
            },
            fraud_type: self.opt("fraud_type", as_string)?,
            label_time: self.long("label_time")?,
        })
    }
}
