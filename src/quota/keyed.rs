//! Keyed quotas: one window per key (e.g. per user and ticket), bounded in memory: a key is
//! dropped once its window has passed without a grant, and keys beyond `max_keys` share one
//! overflow window, which still never lets any of them exceed the limit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use crate::clock::Time;
use crate::config::QuotaConfig;

use super::window::Window;

struct KeyState {
    window: Window,
    /// After this, the key's window holds no grant: it can be forgotten.
    idle_at: Time,
}

pub struct Keyed {
    cfg: QuotaConfig,
    keys: HashMap<Arc<str>, KeyState>,
    /// Keys by the time they may go idle (checked and re-queued when they were used since).
    idle: BinaryHeap<Reverse<(Time, Arc<str>)>>,
    overflow: Window,
    /// Grants that had to go through the overflow window (a metric).
    pub overflowed: u64,
}

impl Keyed {
    pub fn new(cfg: &QuotaConfig) -> Keyed {
        Keyed {
            cfg: cfg.clone(),
            keys: HashMap::new(),
            idle: BinaryHeap::new(),
            overflow: Window::new(cfg),
            overflowed: 0,
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn span(&self) -> std::time::Duration {
        self.cfg.window + self.cfg.margin
    }

    /// Forgets keys whose window has passed.
    fn sweep(&mut self, now: Time) {
        while let Some(Reverse((at, _))) = self.idle.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, key)) = self.idle.pop().expect("peeked");
            match self.keys.get(&key) {
                Some(k) if k.idle_at <= now => {
                    self.keys.remove(&key);
                }
                Some(k) => self.idle.push(Reverse((k.idle_at, key))),
                None => {}
            }
        }
    }

    /// When one more request under `key` could go (`None`: now); with `share`, while fewer than
    /// that many are counted (a replica's share while the shared ledger is unreachable).
    pub fn blocked_until(&mut self, key: &str, share: Option<u32>, now: Time) -> Option<Time> {
        self.sweep(now);
        let full = self.keys.len() >= self.cfg.max_keys;
        let window = match self.keys.get_mut(key) {
            Some(k) => &mut k.window,
            None if full => &mut self.overflow,
            None if share == Some(0) => return Some(now + self.cfg.window),
            None => return None,
        };
        match share {
            Some(0) => Some(now + self.cfg.window),
            Some(n) => window.blocked_below(n, now),
            None => window.blocked_until(now),
        }
    }

    pub fn charge(&mut self, key: &Arc<str>, now: Time) {
        self.sweep(now);
        let idle_at = now + self.span();
        if let Some(k) = self.keys.get_mut(key) {
            k.window.charge(now);
            k.idle_at = idle_at;
        } else if self.keys.len() < self.cfg.max_keys {
            let mut window = Window::new(&self.cfg);
            window.charge(now);
            self.keys.insert(key.clone(), KeyState { window, idle_at });
            self.idle.push(Reverse((idle_at, key.clone())));
        } else {
            self.overflow.charge(now);
            self.overflowed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{QuotaScope, WindowKind};

    fn keyed(limit: u32, max_keys: usize) -> Keyed {
        Keyed::new(&QuotaConfig {
            name: "per-ticket".into(),
            limit,
            window: Duration::from_secs(600),
            kind: WindowKind::Sliding,
            scope: QuotaScope::Route,
            margin: Duration::ZERO,
            sync: None,
            reserve: 0,
            key: vec![crate::config::KeyPart::Path("id".into())],
            max_keys,
            enforce: true,
            schedule: None,
            forecast: false,
        })
    }

    #[test]
    fn an_exhausted_key_blocks_only_itself() {
        let mut k = keyed(2, 100);
        let now = Time::from_nanos(1_000_000_000_000);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        k.charge(&a, now);
        k.charge(&a, now);
        assert_eq!(
            k.blocked_until("a", None, now),
            Some(now + Duration::from_secs(600))
        );
        assert_eq!(k.blocked_until("b", None, now), None);
        k.charge(&b, now);
        assert_eq!(k.len(), 2);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_keys_and_idle_keys_are_dropped() {
        let mut k = keyed(3, 1_000);
        let start = Time::from_nanos(1_000_000_000_000);
        for i in 0..100_000u64 {
            let now = start + Duration::from_millis(i);
            let key: Arc<str> = format!("ticket-{i}").into();
            assert!(k.blocked_until(&key, None, now).is_none() || k.len() == 1_000);
            k.charge(&key, now);
            assert!(k.len() <= 1_000);
        }
        assert_eq!(k.len(), 1_000);
        assert_eq!(k.overflowed, 99_000, "the rest shared the overflow window");
        // Ten minutes after the last grant every key's window has passed.
        let later = start + Duration::from_millis(100_000) + Duration::from_secs(600);
        k.sweep(later);
        assert_eq!(k.len(), 0);
    }

    #[test]
    fn overflow_keys_share_one_window_so_the_limit_still_holds() {
        let mut k = keyed(2, 1);
        let now = Time::from_nanos(1_000_000_000_000);
        k.charge(&Arc::from("tracked"), now);
        for key in ["x", "y"] {
            assert_eq!(k.blocked_until(key, None, now), None);
            k.charge(&Arc::from(key), now);
        }
        assert!(
            k.blocked_until("z", None, now).is_some(),
            "overflow is full"
        );
        assert_eq!(
            k.blocked_until("tracked", None, now),
            None,
            "the tracked key has its own room"
        );
    }
}
