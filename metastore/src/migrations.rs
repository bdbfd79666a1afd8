//! The numbered SQL files in `migrations/`, embedded at build time.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

macro_rules! migrations {
    ($dir:literal: $($version:literal => $file:literal),+ $(,)?) => {
        vec![$(Migration::new(
            $version,
            Cow::Borrowed($file),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(include_str!(concat!("../../migrations/", $dir, "/", $file))),
            false,
        )),+]
    };
}

pub fn sqlite() -> Migrator {
    Migrator {
        migrations: Cow::Owned(migrations!("sqlite":
            1 => "0001_initial.sql",
            2 => "0002_claim_order.sql",
            3 => "0003_ownership.sql",
            4 => "0004_merges.sql",
            5 => "0005_notify.sql",
            6 => "0006_schedules.sql",
            7 => "0007_parts_time.sql",
            8 => "0008_part_tokens.sql",
            9 => "0009_fleet.sql",
            10 => "0010_planning.sql",
            11 => "0011_copies.sql",
            12 => "0012_merge_files.sql",
            13 => "0013_files_removed.sql",
        )),
        ..Migrator::DEFAULT
    }
}

pub fn postgres() -> Migrator {
    Migrator {
        migrations: Cow::Owned(migrations!("postgres":
            1 => "0001_initial.sql",
            2 => "0002_claim_order.sql",
            3 => "0003_ownership.sql",
            4 => "0004_merges.sql",
            5 => "0005_notify.sql",
            6 => "0006_schedules.sql",
            7 => "0007_parts_time.sql",
            8 => "0008_part_tokens.sql",
            9 => "0009_fleet.sql",
            10 => "0010_planning.sql",
            11 => "0011_copies.sql",
            12 => "0012_merge_files.sql",
            13 => "0013_files_removed.sql",
        )),
        ..Migrator::DEFAULT
    }
}
