//! The identifiers every layer passes around: request ids, credential fingerprints, and the
//! indexes of clients, quotas, routes and lanes in the validated config.

use std::fmt;
use std::str::FromStr;

use http::HeaderMap;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Index of a client in the config's `clients` (the built-in `default` is always present, last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientId(pub usize);

/// Index of a quota in the config's `quotas` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuotaId(pub usize);

/// Index of a route in the route table (configured routes first, then the built-in defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteId(pub usize);

/// A lane is the set of quotas a request consumes; parked writes of one lane leave in arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneId(pub usize);

/// An unguessable request id: 128 random bits, shown as 32 lowercase hex digits. Held as two
/// `u64` (high first, so it orders as the number): aligned to 8 rather than a `u128`'s 16, it
/// packs without padding beside the other fields of a parked write and in the queue's indexes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId([u64; 2]);

impl std::hash::Hash for EntryId {
    /// As the number: one 16-byte write (an array would also hash its length).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_u128().hash(state);
    }
}

impl EntryId {
    pub fn from_u128(v: u128) -> EntryId {
        EntryId([(v >> 64) as u64, v as u64])
    }

    pub fn as_u128(self) -> u128 {
        (u128::from(self.0[0]) << 64) | u128::from(self.0[1])
    }

    pub fn random() -> EntryId {
        let mut bytes = [0u8; 16];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random source is available");
        EntryId::from_u128(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.as_u128())
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for EntryId {
    type Err = String;
    fn from_str(s: &str) -> Result<EntryId, String> {
        let bad = || format!("{s:?} is not a request id (32 lowercase hex digits)");
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        u128::from_str_radix(s, 16)
            .map(EntryId::from_u128)
            .map_err(|_| bad())
    }
}

/// A one-way digest of a request's credential (`Authorization`), never the credential itself.
/// A status read must present the same credential as the parked request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    pub fn from_bytes(b: [u8; 16]) -> Fingerprint {
        Fingerprint(b)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// 32 lowercase hex digits: what client `credential` rules are written with.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn of(headers: &HeaderMap) -> Fingerprint {
        let cred = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let d = digest::digest(&digest::SHA256, cred);
        let mut out = [0u8; 16];
        out.copy_from_slice(&d.as_ref()[..16]);
        Fingerprint(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_parse_back() {
        let id = EntryId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<EntryId>(), Ok(id));
        assert_ne!(EntryId::random(), id);
        assert!("xyz".parse::<EntryId>().is_err());
        assert!(
            "0123456789ABCDEF0123456789abcdef"
                .parse::<EntryId>()
                .is_err()
        );
    }

    #[test]
    fn ids_keep_their_number_and_order_it_as_the_number() {
        let values = [
            0,
            1,
            u128::from(u64::MAX),
            1 << 64,
            (1 << 64) + 1,
            u128::MAX - 1,
            u128::MAX,
        ];
        for v in values {
            assert_eq!(EntryId::from_u128(v).as_u128(), v);
            assert_eq!(EntryId::from_u128(v).to_string(), format!("{v:032x}"));
        }
        for w in values.windows(2) {
            assert!(EntryId::from_u128(w[0]) < EntryId::from_u128(w[1]), "{w:?}");
        }
        assert_eq!(std::mem::align_of::<EntryId>(), 8);
    }

    #[test]
    fn fingerprints_differ_by_credential_and_hide_it() {
        let mut a = HeaderMap::new();
        a.insert(http::header::AUTHORIZATION, "Bearer one".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert(http::header::AUTHORIZATION, "Bearer two".parse().unwrap());
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&b));
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&a.clone()));
        assert!(!format!("{:?}", Fingerprint::of(&a)).contains("one"));
    }
}
