//! Lifecycle states of jobs, shards and leases, and the class of a shard failure.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!("unknown {} `{other}`", stringify!($name))),
                }
            }
        }
    };
}

string_enum!(
    /// pending -> planning -> running -> finalizing -> succeeded | failed | cancelled
    JobState {
        Pending = "pending",
        Planning = "planning",
        Running = "running",
        Finalizing = "finalizing",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

string_enum!(
    /// pending -> leased -> done | dead
    ShardState {
        Pending = "pending",
        Leased = "leased",
        Done = "done",
        Dead = "dead",
    }
);

string_enum!(
    /// What a heartbeat learns about one lease.
    LeaseState {
        /// Still yours; extended.
        Held = "held",
        /// Expired and granted elsewhere, or finished: stop and discard uncommitted work.
        Lost = "lost",
        /// The job was cancelled: stop at the next batch.
        Cancelled = "cancelled",
    }
);

string_enum!(
    /// How the coordinator treats a failed shard.
    FailureClass {
        /// I/O, throttling, lease lost, worker died: back off and retry up to max_attempts.
        Retryable = "retryable",
        /// Corrupt file, schema mismatch: dead at once, no retry.
        Permanent = "permanent",
    }
);

impl JobState {
    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_as_text() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
            assert_eq!(
                serde_json::to_string(s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        for s in ShardState::ALL {
            assert_eq!(s.as_str().parse::<ShardState>().unwrap(), *s);
        }
        assert!("nope".parse::<JobState>().is_err());
    }
}
