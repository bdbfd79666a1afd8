//! Lifecycle states of jobs, shards and leases, and the class of a shard failure. Each is
//! spelled by its snake_case name everywhere: JSON, SQL, `Display` and `FromStr` alike.

use serde::{Deserialize, Serialize};
use strum::{Display, EnumString, IntoStaticStr, VariantArray};

/// A state enum: strum derives its names from the variants' (snake_case, as serde's); this
/// adds the API other crates use: `ALL`, `as_str`, a `FromStr` error naming the enum, and
/// `TryFrom<String>` (how the metastore decodes a state column).
macro_rules! state_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[derive(Display, EnumString, IntoStaticStr, VariantArray)]
        #[serde(rename_all = "snake_case")]
        #[strum(serialize_all = "snake_case", parse_err_ty = String, parse_err_fn = Self::unknown)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = <$name as VariantArray>::VARIANTS;
            /// The name, as stored and sent.
            pub fn as_str(self) -> &'static str { self.into() }
            fn unknown(s: &str) -> String { format!("unknown {} `{s}`", stringify!($name)) }
        }
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> { s.parse() }
        }
    };
}

state_enum!(
    /// pending -> planning -> [queued ->] running -> finalizing -> succeeded | failed |
    /// cancelled. A job is queued while the coordinator runs its `--max-running-jobs`.
    JobState {
        Pending,
        Planning,
        Queued,
        Running,
        Finalizing,
        Succeeded,
        Failed,
        Cancelled,
    }
);

state_enum!(
    /// pending -> leased -> done | dead
    ShardState {
        Pending,
        Leased,
        Done,
        Dead,
    }
);

state_enum!(
    /// What a heartbeat learns about one lease.
    LeaseState {
        /// Still yours; extended.
        Held,
        /// Expired and granted elsewhere, or finished: stop and discard uncommitted work.
        Lost,
        /// The job was cancelled: stop at the next batch.
        Cancelled,
    }
);

state_enum!(
    /// A job's completion callback: pending until acknowledged (delivered) or its deadline
    /// passes (abandoned); a retried job's callback is pending again.
    NotifyState {
        Pending,
        Delivered,
        Abandoned,
    }
);

state_enum!(
    /// What a schedule does with the fire times that passed while no coordinator ran.
    #[derive(Default)]
    CatchUp {
        /// Runs none that is more than a minute late.
        Skip,
        /// Runs the newest of them (the default).
        #[default]
        Latest,
        /// Runs every one of them, oldest first.
        All,
    }
);

state_enum!(
    /// How the coordinator treats a failed shard.
    FailureClass {
        /// I/O, throttling, lease lost, worker died: back off and retry up to max_attempts.
        Retryable,
        /// Corrupt file, schema mismatch: dead at once, no retry.
        Permanent,
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

    /// Every name agrees in `as_str`, `Display`, `FromStr`, `TryFrom<String>` and serde.
    fn round_trips<T>(all: &[T], as_str: fn(T) -> &'static str)
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + Serialize,
        T: std::str::FromStr<Err = String> + TryFrom<String, Error = String>,
        T: for<'de> Deserialize<'de>,
    {
        for &s in all {
            let name = as_str(s);
            assert_eq!(s.to_string(), name);
            assert_eq!(name.parse::<T>().unwrap(), s);
            assert_eq!(T::try_from(name.to_string()).unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<T>(&format!("\"{name}\"")).unwrap(),
                s
            );
        }
    }

    #[test]
    fn states_round_trip_as_text() {
        round_trips(JobState::ALL, JobState::as_str);
        round_trips(ShardState::ALL, ShardState::as_str);
        round_trips(LeaseState::ALL, LeaseState::as_str);
        round_trips(FailureClass::ALL, FailureClass::as_str);
        round_trips(NotifyState::ALL, NotifyState::as_str);
        round_trips(CatchUp::ALL, CatchUp::as_str);
        assert_eq!(JobState::ALL.len(), 8);
        assert_eq!(JobState::Queued.as_str(), "queued");
        assert_eq!(CatchUp::default(), CatchUp::Latest);
        assert_eq!(JobState::Finalizing.as_str(), "finalizing");
        assert_eq!(FailureClass::Retryable.as_str(), "retryable");
    }

    #[test]
    fn unknown_names_are_refused_by_name() {
        assert_eq!(
            "nope".parse::<JobState>().unwrap_err(),
            "unknown JobState `nope`"
        );
        assert_eq!(
            ShardState::try_from("Leased".to_string()).unwrap_err(),
            "unknown ShardState `Leased`"
        );
        assert!("".parse::<LeaseState>().is_err());
        assert!("retry".parse::<FailureClass>().is_err());
    }
}
