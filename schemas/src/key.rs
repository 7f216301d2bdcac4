//! [`Key`]: an entity key (`card_id`, `user_id`, ...) held inline when short.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest key held inline.
const INLINE: usize = 22;

/// An entity key: a string of at most 22 bytes is held inline (24 bytes in
/// all, no heap), a longer one is shared. Copying a short key touches no
/// other memory: no allocation per event, no reference count in another cache
/// line per emitted row, and comparing two keys reads no pointer.
///
/// It behaves as the string it holds: equality, order, hash and its serde
/// form are those of the string.
#[derive(Clone)]
pub struct Key(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl Key {
    /// The key as a string.
    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                // SAFETY: the bytes were copied whole from a `&str` (see
                // `From<&str>`), so `bytes[..len]` is valid UTF-8. Checking
                // it again cost ~10% of a backfill, which compares keys
                // while it sorts them into arrangements.
                #[allow(unsafe_code)]
                unsafe {
                    std::str::from_utf8_unchecked(&bytes[..*len as usize])
                }
            }
            Repr::Shared(s) => s,
        }
    }
}

impl From<&str> for Key {
    #[inline]
    fn from(s: &str) -> Key {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Key(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            Key(Repr::Shared(Arc::from(s)))
        }
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key::from(s.as_str())
    }
}

impl Deref for Key {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Key {
    /// Sound for maps: a key's equality and hash are its string's.
    #[inline]
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Key {
    #[inline]
    fn eq(&self, other: &Key) -> bool {
        match (&self.0, &other.0) {
            // Canonical: a string is inline iff it is short, and the unused
            // bytes are zero, so inline keys compare as plain bytes.
            (Repr::Inline { len: a, bytes: x }, Repr::Inline { len: b, bytes: y }) => {
                a == b && x == y
            }
            (Repr::Shared(x), Repr::Shared(y)) => x == y,
            _ => false,
        }
    }
}

impl Eq for Key {}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Hash for Key {
    /// As the string: the routing hash of a key is the same whatever its
    /// representation.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(Key::from(s))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;

    fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
        let mut h = DefaultHasher::new();
        value.hash(&mut h);
        h.finish()
    }

    /// Keys behave as their strings on both sides of the inline limit:
    /// equality, order, hash, display and the bincode/JSON forms.
    #[test]
    fn keys_behave_as_their_strings() {
        let strings = [
            "",
            "a",
            "a\0",
            "card-1",
            "card-10",
            "card-2",
            "twenty_two_bytes_xxxxx",
            "twenty_three_bytes_xxxx",
            "twenty_three_bytes_xxxy",
            "été",
            "a much longer key than any inline one could ever hold",
        ];
        assert_eq!(std::mem::size_of::<Key>(), 24);
        for a in strings {
            let k = Key::from(a);
            assert_eq!(k.as_str(), a);
            assert_eq!(k.to_string(), a);
            assert_eq!(format!("{k:?}"), format!("{a:?}"));
            assert_eq!(hash_of(&k), hash_of(a));
            assert_eq!(matches!(k.0, Repr::Inline { .. }), a.len() <= 22, "{a:?}");
            let json = serde_json::to_string(&k).expect("serializes");
            assert_eq!(json, serde_json::to_string(a).expect("serializes"));
            assert_eq!(serde_json::from_str::<Key>(&json).expect("parses"), k);
            for b in strings {
                let j = Key::from(b);
                assert_eq!(k == j, a == b, "{a:?} vs {b:?}");
                assert_eq!(k.cmp(&j), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
