//! One statement in an explicit transaction, in one round trip: BEGIN
//! (`sql/queries/begin_durable.sql`: the commit waits for a synchronous
//! standby when the server names one), the statement, COMMIT, pipelined.
//! The claim and the recorder's write run this way, so that no claimed row
//! is sent and no outcome counts as written before its commit is known.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Error, Row, Statement};

const BEGIN_SQL: &str = include_str!("../../sql/queries/begin_durable.sql");

/// Runs `statement` between BEGIN and COMMIT, all three sent at once, and
/// returns its rows once the COMMIT has answered. An error (the statement's,
/// the COMMIT's, or a connection lost on the way) leaves it unknown whether
/// the rows were committed unless the statement itself failed (then the
/// COMMIT rolls back): callers treat every error as "maybe committed".
///
/// tokio-postgres sends a request when its future is first polled, and
/// answers in the order sent (its "Pipelining" documentation);
/// [`futures_util::future::try_join3`] polls its three futures in order on
/// its first poll, and each of these sends on its first poll (the statement
/// is already prepared), so the server gets BEGIN, the statement, COMMIT, in
/// that order. If the statement fails, the COMMIT of the aborted
/// transaction rolls it back and the statement's error is returned.
pub async fn query_committed(
    client: &Client,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, Error> {
    let begin = client.batch_execute(BEGIN_SQL);
    let query = client.query(statement, params);
    let commit = client.batch_execute("COMMIT");
    let ((), rows, ()) = futures_util::future::try_join3(begin, query, commit).await?;
    Ok(rows)
}
