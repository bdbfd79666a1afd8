//! The numbered SQL files in `migrations/`, embedded at build time. Both dialects have the
//! same files, listed once.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

/// One migration: its version, its file, and the file's SQL in each dialect's folder.
struct File {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

macro_rules! files {
    ($($version:literal => $name:literal),+ $(,)?) => {
        [$(File {
            version: $version,
            name: $name,
            sqlite: include_str!(concat!("../../migrations/sqlite/", $name)),
            postgres: include_str!(concat!("../../migrations/postgres/", $name)),
        }),+]
    };
}

const FILES: &[File] = &files! {
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
    14 => "0014_garbage.sql",
    15 => "0015_planner_claim.sql",
};

pub fn sqlite() -> Migrator {
    migrator(|f| f.sqlite)
}

pub fn postgres() -> Migrator {
    migrator(|f| f.postgres)
}

/// Every migration, with its SQL in one dialect.
fn migrator(sql: fn(&File) -> &'static str) -> Migrator {
    let migrations = FILES.iter().map(|f| {
        Migration::new(
            f.version,
            Cow::Borrowed(f.name),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(sql(f)),
            false,
        )
    });
    Migrator {
        migrations: Cow::Owned(migrations.collect()),
        ..Migrator::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::FILES;

    #[test]
    fn every_migration_file_of_each_dialect_is_listed_in_order() {
        let listed: Vec<&str> = FILES.iter().map(|f| f.name).collect();
        for dialect in ["sqlite", "postgres"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../migrations")
                .join(dialect);
            let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".sql"))
                .collect();
            on_disk.sort();
            assert_eq!(on_disk, listed, "{dialect}: a migration file is not listed");
        }
        for (n, f) in (1..).zip(FILES) {
            assert_eq!(f.version, n, "{} is out of order", f.name);
            assert!(f.name.starts_with(&format!("{n:04}_")), "{}", f.name);
        }
    }
}
