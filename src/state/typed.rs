//! Typed state values: rkyv archives, validated (bytecheck) on every read, so a damaged
//! or foreign value is a corruption error naming the namespace, never undefined
//! behaviour. Values are copied into an aligned buffer before validation: the arena
//! aligns values to 8 bytes, rkyv may want 16.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use super::{StateError, StateView};

impl StateView<'_> {
    /// Stores `value` under `key` as an rkyv archive.
    pub fn put_typed<T>(&mut self, key: &[u8], value: &T) -> Result<(), StateError>
    where
        T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
    {
        let bytes = rkyv::to_bytes::<rancor::Error>(value)
            .map_err(|e| self.corrupt(format!("cannot encode a state value: {e}")))?;
        self.put(key, &bytes)
    }

    /// The value under `key`, validated and decoded.
    pub fn get_typed<T>(&self, key: &[u8]) -> Result<Option<T>, StateError>
    where
        T: Archive,
        T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
            + Deserialize<T, HighDeserializer<rancor::Error>>,
    {
        let Some(bytes) = self.get(key) else {
            return Ok(None);
        };
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<T, rancor::Error>(&aligned)
            .map(Some)
            .map_err(|e| self.corrupt(format!("a typed value does not validate: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MemoryStore, StateStore};

    #[derive(Debug, PartialEq, Archive, Serialize, Deserialize)]
    struct Meta {
        version: u8,
        watermark: i64,
        names: Vec<String>,
    }

    #[test]
    fn typed_values_round_trip_and_damage_is_an_error() {
        let mut store = MemoryStore::new();
        let meta = Meta {
            version: 3,
            watermark: -42,
            names: vec!["a".into(), "bc".into()],
        };
        {
            let mut view = StateView::open(&mut store, "q").unwrap();
            view.put_typed(b"m", &meta).unwrap();
            assert_eq!(view.get_typed::<Meta>(b"m").unwrap(), Some(meta));
            assert_eq!(view.get_typed::<Meta>(b"absent").unwrap(), None);
            // A value too short for the type fails validation.
            view.put(b"bad", &[1, 2, 3]).unwrap();
            let err = view.get_typed::<Meta>(b"bad").unwrap_err();
            assert!(err.to_string().contains("`q`"), "{err}");
        }
        let ns = store.namespace("q").unwrap();
        // A string length pointing past the end fails validation too.
        let mut damaged = store.get(ns, b"m").unwrap().to_vec();
        let n = damaged.len();
        damaged[n - 8..].copy_from_slice(&[0xff; 8]);
        store.put(ns, b"m", &damaged).unwrap();
        let view = StateView::open(&mut store, "q").unwrap();
        assert!(view.get_typed::<Meta>(b"m").is_err());
    }
}
