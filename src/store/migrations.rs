//! The migrations this binary knows: the numbered files of
//! `sql/migrations/`, compiled in, oldest first, each with its online part
//! (indexes built or dropped outside the migration's transaction). The
//! runner that applies them is [`crate::store::migrate`].

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
    /// `CREATE INDEX CONCURRENTLY IF NOT EXISTS <name> ...` and `DROP INDEX
    /// CONCURRENTLY IF EXISTS outbox.<name>` statements, each ending in
    /// `;`, run one by one outside a transaction ("" for none): the builds
    /// first, then the drops.
    pub online: &'static str,
}

/// Every migration this binary knows, oldest first. Append only: a released
/// migration is never edited (the checksum check refuses that).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox_schema",
        sql: include_str!("../../sql/migrations/0001_outbox_schema.sql"),
        online: "",
    },
    Migration {
        version: 2,
        name: "notifications",
        sql: include_str!("../../sql/migrations/0002_notifications.sql"),
        online: "",
    },
    Migration {
        version: 3,
        name: "replay",
        sql: include_str!("../../sql/migrations/0003_replay.sql"),
        online: "",
    },
    Migration {
        version: 4,
        name: "retention",
        sql: include_str!("../../sql/migrations/0004_retention.sql"),
        online: "",
    },
    Migration {
        version: 5,
        name: "endpoint_circuits",
        sql: include_str!("../../sql/migrations/0005_endpoint_circuits.sql"),
        online: include_str!("../../sql/migrations/0005_endpoint_circuits.online.sql"),
    },
    Migration {
        version: 6,
        name: "claim_indexes",
        sql: include_str!("../../sql/migrations/0006_claim_indexes.sql"),
        online: include_str!("../../sql/migrations/0006_claim_indexes.online.sql"),
    },
    Migration {
        version: 7,
        name: "notifications_go_with_their_email",
        sql: include_str!("../../sql/migrations/0007_notifications_go_with_their_email.sql"),
        online: "",
    },
    Migration {
        version: 8,
        name: "signing_secrets",
        sql: include_str!("../../sql/migrations/0008_signing_secrets.sql"),
        online: "",
    },
    Migration {
        version: 9,
        name: "light_enqueue",
        sql: include_str!("../../sql/migrations/0009_light_enqueue.sql"),
        online: include_str!("../../sql/migrations/0009_light_enqueue.online.sql"),
    },
    Migration {
        version: 10,
        name: "signing_secrets_kept",
        sql: include_str!("../../sql/migrations/0010_signing_secrets_kept.sql"),
        online: "",
    },
    Migration {
        version: 11,
        name: "tenant_pause",
        sql: include_str!("../../sql/migrations/0011_tenant_pause.sql"),
        online: "",
    },
    Migration {
        version: 12,
        name: "circuit_moved_by_its_probe",
        sql: include_str!("../../sql/migrations/0012_circuit_moved_by_its_probe.sql"),
        online: "",
    },
    Migration {
        version: 13,
        name: "scheduled_retries",
        sql: include_str!("../../sql/migrations/0013_scheduled_retries.sql"),
        online: include_str!("../../sql/migrations/0013_scheduled_retries.online.sql"),
    },
    Migration {
        version: 14,
        name: "endpoint_destinations",
        sql: include_str!("../../sql/migrations/0014_endpoint_destinations.sql"),
        online: "",
    },
];

impl Migration {
    /// What the checksum covers: both parts.
    pub(super) fn text(&self) -> String {
        format!("{}{}", self.sql, self.online)
    }

    /// The online part's statements, comments dropped, each with the name
    /// of the index it builds or drops.
    fn online_steps(&self) -> Vec<OnlineIndex> {
        let code: String = self
            .online
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        code.split(';')
            .map(str::trim)
            .filter(|statement| !statement.is_empty())
            .map(|statement| {
                let (drop, rest) = match statement.split_once("IF NOT EXISTS") {
                    Some((_, rest)) => (false, rest),
                    None => (
                        true,
                        statement.split_once("IF EXISTS").map_or("", |(_, r)| r),
                    ),
                };
                let name = rest.split_whitespace().next().unwrap_or_default();
                OnlineIndex {
                    name: name.trim_start_matches("outbox.").to_owned(),
                    sql: statement.to_owned(),
                    drop,
                }
            })
            .collect()
    }
}

/// One index built, or dropped, outside the migration's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineIndex {
    /// In schema `outbox`.
    pub name: String,
    pub sql: String,
    /// `DROP INDEX CONCURRENTLY`: an index a later migration replaced.
    pub drop: bool,
}

/// The schema version this binary expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The online indexes of the migrations this binary knows that no later
/// migration drops, oldest first: the ones the schema needs.
pub(super) fn all_online_indexes() -> Vec<OnlineIndex> {
    let steps: Vec<OnlineIndex> = MIGRATIONS
        .iter()
        .flat_map(Migration::online_steps)
        .collect();
    steps
        .iter()
        .enumerate()
        .filter(|(i, step)| {
            !step.drop && !steps[i + 1..].iter().any(|s| s.drop && s.name == step.name)
        })
        .map(|(_, step)| step.clone())
        .collect()
}

/// The indexes the online parts drop (replaced by others), oldest first.
pub(super) fn all_online_drops() -> Vec<OnlineIndex> {
    MIGRATIONS
        .iter()
        .flat_map(Migration::online_steps)
        .filter(|step| step.drop)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty(), "{}", m.name);
        }
    }

    #[test]
    fn online_parts_hold_only_named_concurrent_index_builds_and_drops() {
        let steps: Vec<OnlineIndex> = MIGRATIONS
            .iter()
            .flat_map(Migration::online_steps)
            .collect();
        assert!(!steps.is_empty());
        for index in &steps {
            let prefix = if index.drop {
                "DROP INDEX CONCURRENTLY IF EXISTS outbox."
            } else {
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS "
            };
            assert!(index.sql.starts_with(prefix), "{}", index.sql);
            assert!(
                !index.name.is_empty()
                    && index
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_'),
                "{:?}",
                index.name
            );
        }
        let names = |steps: Vec<OnlineIndex>| -> Vec<String> {
            steps.into_iter().map(|i| i.name).collect()
        };
        // events_endpoint_due (0005) was replaced by 0006, and with it the
        // claim index of 0001, which no online part built; 0009 replaced
        // 0001's company index.
        assert_eq!(
            names(all_online_indexes()),
            [
                "events_pending_due",
                "events_endpoint_pending",
                "events_lease_expiry",
                "events_company_settled",
                "events_scheduled"
            ]
        );
        assert_eq!(
            names(all_online_drops()),
            [
                "events_endpoint_due",
                "events_due",
                "events_company_created"
            ]
        );
    }

    #[test]
    fn a_migration_without_an_online_part_keeps_its_checksum_text() {
        assert_eq!(MIGRATIONS[0].text(), MIGRATIONS[0].sql);
    }
}
