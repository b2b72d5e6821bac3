//! The factor model's writer lease: at most one instance of the fleet trains
//! and publishes the model at a time. Consumes the instances' requests
//! (acquire, renew, release); produces, in Redis, `{p}:reco:lease` (the
//! holder, expiring after `reco.lease_ms` unless renewed) and
//! `{p}:reco:token`, a fencing token incremented at every acquisition.
//!
//! Guarantee: the holder's model writes carry its token and Redis refuses
//! any whose token is older than the newest (see [`super::store`]), so an
//! instance that lost the lease while frozen or cut off cannot overwrite
//! its successor's model when it comes back. Without Redis (a memory
//! store), the lease is local and always held: there is nothing to share.

use std::time::Duration;

/// Takes the lease if nobody else holds it: the new token, else 0. A lease
/// already held under this instance's own name comes from an acquisition
/// or renewal of its own whose reply it never got (Redis ran it after the
/// client's timeout): it is taken again under a new token, so the instance
/// does not wait out a lease nobody uses, and any write still in flight
/// from its earlier term is refused.
const ACQUIRE_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"#;

/// Extends the lease if this holder still has it. It also takes it back
/// when nobody took it since (expired while Redis was away, the token still
/// this holder's) or when Redis lost both keys (restarted empty): in
/// neither case did another instance acquire it.
const RENEW_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
local tok = redis.call('GET', KEYS[2])
if not tok then
  if cur then return 0 end
  redis.call('SET', KEYS[2], ARGV[3])
elseif tonumber(tok) ~= tonumber(ARGV[3]) then
  return 0
elseif cur and cur ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Gives the lease up if this holder has it.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// One instance's side of the lease.
pub struct Lease {
    conn: Option<redis::aio::ConnectionManager>,
    key: String,
    token_key: String,
    /// `<process id> <instance id>`: who holds it, for operators and tests.
    me: String,
    ttl: Duration,
    timeout: Duration,
}

impl Lease {
    /// The lease in Redis under `prefix`; `conn: None` gives a local lease.
    pub fn new(
        conn: Option<redis::aio::ConnectionManager>,
        prefix: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Self {
        Lease {
            conn,
            key: format!("{prefix}:reco:lease"),
            token_key: format!("{prefix}:reco:token"),
            me: crate::timefmt::instance_label(),
            ttl,
            timeout,
        }
    }

    /// The same lease under another holder name (the default is
    /// `<process id> <instance id>`): for several holders in one process.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.me = name.into();
        self
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn eval(&self, script: &str, args: &[String]) -> Result<i64, String> {
        let Some(conn) = &self.conn else {
            return Ok(1);
        };
        let mut conn = conn.clone();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(2).arg(&self.key).arg(&self.token_key);
        for a in args {
            cmd.arg(a);
        }
        match tokio::time::timeout(self.timeout, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no reply within {} ms", self.timeout.as_millis())),
        }
    }

    /// Tries to take the lease: its fencing token when taken.
    pub async fn acquire(&self) -> Result<Option<u64>, String> {
        if self.conn.is_none() {
            return Ok(Some(0));
        }
        let t = self
            .eval(
                ACQUIRE_LUA,
                &[self.me.clone(), self.ttl.as_millis().to_string()],
            )
            .await?;
        Ok((t > 0).then_some(t as u64))
    }

    /// Extends the lease held with `token`; `false` once it is lost.
    pub async fn renew(&self, token: u64) -> Result<bool, String> {
        let r = self
            .eval(
                RENEW_LUA,
                &[
                    self.me.clone(),
                    self.ttl.as_millis().to_string(),
                    token.to_string(),
                ],
            )
            .await?;
        Ok(r == 1)
    }

    /// Gives the lease up (at a stop), so a standby takes over at once.
    pub async fn release(&self) {
        if let Err(e) = self.eval(RELEASE_LUA, std::slice::from_ref(&self.me)).await {
            tracing::warn!(error = %e, "could not release the model writer lease");
        }
    }
}
