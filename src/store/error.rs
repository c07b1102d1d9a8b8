//! What a failed statement means for whoever retries it: the one place where
//! SQLSTATEs are sorted into "wait and try again", "this data will never
//! go in" and "the schema or the privileges are not what this binary was
//! built for".

/// How a statement failed, for the loop that ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The same statement will succeed later: the connection broke, the
    /// server is starting, stopping or in recovery (a standby after a
    /// failover), a lock or a serialization conflict, a timeout, resources
    /// short. Retried as it is.
    Transient,
    /// Refused for what it carries (SQLSTATE classes 22, data exception,
    /// and 23, integrity constraint): the same values fail the same way,
    /// other values may not.
    BadData,
    /// Refused for what the database has become: an undefined column,
    /// table or function (a newer binary's migration ran), a privilege
    /// revoked, an error raised by a trigger or rule someone added, and
    /// anything else this list does not know. Retrying unchanged does not
    /// help; the schema is worth checking again.
    Structural,
}

/// Sorts `e` (see [`ErrorKind`]).
pub fn kind(e: &tokio_postgres::Error) -> ErrorKind {
    match e.code() {
        // No SQLSTATE: the connection, the protocol, a closed client.
        None => ErrorKind::Transient,
        Some(code) => kind_of(code.code()),
    }
}

/// Sorts a SQLSTATE by its class and, within classes that hold both, by
/// its code.
pub fn kind_of(sqlstate: &str) -> ErrorKind {
    let class = sqlstate.get(..2).unwrap_or("");
    match (class, sqlstate) {
        // connection exception; transaction rollback (serialization
        // failure, deadlock); insufficient resources; operator
        // intervention (query_canceled by statement_timeout,
        // admin_shutdown, crash_shutdown, cannot_connect_now); system
        // error (I/O).
        ("08" | "40" | "53" | "57" | "58", _) => ErrorKind::Transient,
        // lock_not_available (lock_timeout), object_in_use.
        (_, "55P03" | "55006") => ErrorKind::Transient,
        // read_only_sql_transaction: connected to a standby (a failover
        // in progress, or a multi-host URL's new primary not yet found).
        (_, "25006") => ErrorKind::Transient,
        // idle_in_transaction_session_timeout, in_failed_sql_transaction:
        // the session, not the statement.
        (_, "25P03" | "25P02") => ErrorKind::Transient,
        ("22" | "23", _) => ErrorKind::BadData,
        _ => ErrorKind::Structural,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_sort_into_transient_bad_data_and_structural() {
        use ErrorKind::*;
        let table = [
            ("08006", Transient, "connection_failure"),
            (
                "08001",
                Transient,
                "sqlclient_unable_to_establish_sqlconnection",
            ),
            ("40001", Transient, "serialization_failure"),
            ("40P01", Transient, "deadlock_detected"),
            ("53300", Transient, "too_many_connections"),
            ("57014", Transient, "query_canceled (statement_timeout)"),
            ("57P01", Transient, "admin_shutdown"),
            ("57P03", Transient, "cannot_connect_now"),
            ("58030", Transient, "io_error"),
            ("55P03", Transient, "lock_not_available"),
            ("25006", Transient, "read_only_sql_transaction (a standby)"),
            ("22001", BadData, "string_data_right_truncation"),
            ("22P05", BadData, "untranslatable_character"),
            ("23505", BadData, "unique_violation"),
            ("23514", BadData, "check_violation"),
            ("42703", Structural, "undefined_column"),
            ("42883", Structural, "undefined_function"),
            ("42P01", Structural, "undefined_table"),
            ("42501", Structural, "insufficient_privilege"),
            ("P0001", Structural, "raise_exception (a trigger)"),
            ("0A000", Structural, "feature_not_supported"),
            ("55000", Structural, "object_not_in_prerequisite_state"),
            ("XX000", Structural, "internal_error"),
            ("", Structural, "no code at all"),
        ];
        for (code, expected, name) in table {
            assert_eq!(kind_of(code), expected, "{code} {name}");
        }
    }
}
