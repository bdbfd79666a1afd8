//! PostgreSQL store: being written; see the Store trait in mod.rs and sqlite.rs.

/// PostgreSQL store.
pub struct PgStore;

impl PgStore {
    pub async fn connect(_url: &str) -> super::Result<Self> {
        Err(super::StoreError::Corrupt(
            "postgres store not built yet".into(),
        ))
    }
}
