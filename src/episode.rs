//! Failures that repeat many times a second while they last (accepts failing at the
//! open-file limit, a listener full, access-log writes failing): the operator hears once when
//! one begins, every 10 s while it lasts, and once when it ends, not once per occurrence.

use std::time::{Duration, Instant};

/// How often a lasting episode is reported again.
const REPEAT: Duration = Duration::from_secs(10);

/// What to say about one more occurrence.
#[derive(Debug, PartialEq, Eq)]
pub enum Tell {
    /// It begins an episode.
    Begins,
    /// The episode goes on, 10 s since it was last told; occurrences so far.
    Lasts(u64),
    /// Nothing, yet.
    Nothing,
}

/// One kind of failure's current episode, if one is going on.
#[derive(Debug, Default)]
pub struct Episode(Option<(Instant, u64)>);

impl Episode {
    /// Counts `n` more occurrences.
    pub fn hit(&mut self, n: u64) -> Tell {
        let now = Instant::now();
        match &mut self.0 {
            None => {
                self.0 = Some((now, n));
                Tell::Begins
            }
            Some((told, count)) => {
                *count += n;
                if now.duration_since(*told) < REPEAT {
                    return Tell::Nothing;
                }
                *told = now;
                Tell::Lasts(*count)
            }
        }
    }

    /// Ends the episode: how many occurrences it had, if one was going on.
    pub fn end(&mut self) -> Option<u64> {
        self.0.take().map(|(_, count)| count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_is_told_when_it_begins_and_counted_to_its_end() {
        let mut e = Episode::default();
        assert_eq!(e.end(), None);
        assert_eq!(e.hit(1), Tell::Begins);
        assert_eq!(e.hit(2), Tell::Nothing);
        assert_eq!(e.end(), Some(3));
        assert_eq!(e.hit(1), Tell::Begins, "a new episode");
    }
}
