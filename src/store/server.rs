//! What the server is, as the daemon and `outboxd check` need to know it:
//! whether it answers, its version, whether autovacuum runs, and what its
//! encoding can store of a receiver's message.

use tokio_postgres::Client;

/// Whether the server's autovacuum runs (it needs `track_counts` too). Every
/// claim and mark leaves a dead row version in `outbox.events`; without
/// vacuum nothing reclaims them.
pub async fn autovacuum_runs(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// What the database can store of a text: its `server_encoding`. outboxd
/// talks UTF-8; the server converts to its own encoding and refuses a
/// character that has no equivalent there (SQLSTATE 22P05), which would make
/// a receiver's message unstorable and the outcome with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// UTF8 (or SQL_ASCII, which stores the bytes as they come): any text.
    Unicode,
    /// LATIN1: U+0000 to U+00FF.
    Latin1,
    /// Any other encoding: ASCII is common to all of them; the rest differs.
    Ascii,
}

impl Charset {
    pub fn of(server_encoding: &str) -> Charset {
        match server_encoding {
            "UTF8" | "SQL_ASCII" => Charset::Unicode,
            "LATIN1" => Charset::Latin1,
            _ => Charset::Ascii,
        }
    }

    fn holds(self, c: char) -> bool {
        match self {
            Charset::Unicode => true,
            Charset::Latin1 => (c as u32) <= 0xFF,
            Charset::Ascii => c.is_ascii(),
        }
    }

    /// `text` with each character this encoding cannot hold written as
    /// `\u{…}` (its code point in hex), so that it can be stored and still
    /// read.
    pub fn storable(self, text: &str) -> std::borrow::Cow<'_, str> {
        // UTF8 holds anything: no look at the text, on every outcome.
        if self == Charset::Unicode || text.chars().all(|c| self.holds(c)) {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            if self.holds(c) {
                out.push(c);
            } else {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
        std::borrow::Cow::Owned(out)
    }
}

/// One round trip on a pooled connection (`/readyz`): the database answers.
pub async fn ping(client: &deadpool_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.simple_query("SELECT 1").await.map(drop)
}

/// The name of the database connected to (`current_database()`): `outboxd
/// migrate` warns when it is the `postgres` maintenance database.
pub async fn database_name(client: &Client) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_database()::text", &[])
        .await?;
    Ok(row.get(0))
}

/// The server's version as it names it (`SHOW server_version`).
pub async fn server_version(client: &Client) -> Result<String, tokio_postgres::Error> {
    let row = client.query_one("SHOW server_version", &[]).await?;
    Ok(row.get(0))
}

/// The database's encoding (`SHOW server_encoding`), named and judged.
pub async fn server_encoding(client: &Client) -> Result<(String, Charset), tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await?;
    let name: String = row.get(0);
    let charset = Charset::of(&name);
    Ok((name, charset))
}

#[cfg(test)]
mod charset_tests {
    use super::Charset;

    #[test]
    fn what_an_encoding_cannot_hold_is_escaped_and_the_rest_kept() {
        let table = [
            // (encoding, text, stored)
            (
                "UTF8",
                "Zahlung storniert ✓ 東京",
                "Zahlung storniert ✓ 東京",
            ),
            ("SQL_ASCII", "€", "€"),
            ("LATIN1", "café ÿ", "café ÿ"),
            (
                "LATIN1",
                "50 € — ok ✓",
                "50 \\u{20ac} \\u{2014} ok \\u{2713}",
            ),
            ("LATIN1", "東京", "\\u{6771}\\u{4eac}"),
            ("WIN1252", "café", "caf\\u{e9}"),
            ("EUC_JP", "plain ASCII", "plain ASCII"),
            ("LATIN1", "", ""),
        ];
        for (encoding, text, stored) in table {
            assert_eq!(
                Charset::of(encoding).storable(text),
                stored,
                "{encoding}: {text:?}"
            );
        }
    }
}
