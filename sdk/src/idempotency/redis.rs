//! A store in Redis, shared by every instance of a service.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::record::{Fingerprint, Lease, Record, StoredResponse};
use super::store::{Claim, IdempotencyStore, StoreError, StoreFuture};

/// Replaces the value with `ARGV[2]` for `ARGV[3]` ms if it still is the caller's claim.
const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Deletes the key if it still is the caller's claim.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extends the key to `ARGV[2]` ms if it still is the caller's claim.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The default key prefix.
const DEFAULT_PREFIX: &str = "keel:idempotency:";

/// An [`IdempotencyStore`] in Redis (feature `redis`): every instance of a service that uses
/// the same Redis and prefix shares its keys, so a retry that lands on another instance is
/// answered with the first instance's response instead of executing again.
///
/// - **Claim**: `SET <prefix><key> <claim> NX PX <lease>`; when the key exists, `GET` reads
///   the claim or the completed response.
/// - **Renew / complete / release**: Lua scripts that act only while the stored value is the
///   caller's own claim (random token + fingerprint), so an instance whose lease ran out can
///   never overwrite or delete the claim another instance took since.
/// - **Values** are a compact binary record (status, headers, body and trailers with length
///   prefixes; Redis strings are binary safe), about the size of the response itself.
/// - **Waiting duplicates** poll with the layer's growing back-off (5 ms up to 200 ms).
///
/// Connections go through a [`ConnectionManager`] that reconnects in the background; while
/// Redis is unreachable every operation fails and the layer refuses keyed requests with
/// 503 / `UNAVAILABLE`. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    complete: redis::Script,
    release: redis::Script,
    renew: redis::Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`) with a 1 s connect and 1 s response
    /// timeout.
    ///
    /// # Errors
    /// When the URL is invalid or Redis cannot be reached now.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::new)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::new)?;
        Ok(Self::from_connection(connection))
    }

    /// A store on an existing connection manager (for custom timeouts, TLS, auth).
    pub fn from_connection(connection: ConnectionManager) -> Self {
        Self {
            connection,
            prefix: Arc::from(DEFAULT_PREFIX),
            scripts: Arc::new(Scripts {
                complete: redis::Script::new(COMPLETE),
                release: redis::Script::new(RELEASE),
                renew: redis::Script::new(RENEW),
            }),
        }
    }

    /// Prefixes every Redis key (default `keel:idempotency:`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn claim_key(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let key = self.redis_key(key);
        let mut connection = self.connection.clone();
        let claim = Lease::new(fingerprint);
        let marker = Record::InFlight(claim.clone()).encode();
        // SET NX and GET are two commands: the key may vanish in between (released or
        // expired). Then the claim is simply tried again.
        for _ in 0..3 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&marker)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .query_async(&mut connection)
                .await
                .map_err(StoreError::new)?;
            if set.is_some() {
                return Ok(Claim::Acquired(claim));
            }
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(StoreError::new)?;
            let Some(value) = value else { continue };
            return match Record::decode(&value).map_err(StoreError::new)? {
                Record::InFlight(held) => Ok(Claim::InFlight {
                    fingerprint: held.fingerprint(),
                }),
                Record::Completed {
                    fingerprint,
                    response,
                } => Ok(Claim::Completed {
                    fingerprint,
                    response,
                }),
            };
        }
        Err(StoreError::new(format!(
            "key {key} changed state on every claim attempt"
        )))
    }

    async fn compare_and(
        &self,
        script: &redis::Script,
        key: &str,
        lease: &Lease,
        args: &[&[u8]],
    ) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let mut invocation = script.key(self.redis_key(key));
        invocation.arg(Record::InFlight(lease.clone()).encode());
        for arg in args {
            invocation.arg(*arg);
        }
        let done: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::new)?;
        Ok(done == 1)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl IdempotencyStore for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> StoreFuture<'a, Claim> {
        Box::pin(self.claim_key(key, fingerprint, lease))
    }

    fn renew<'a>(&'a self, key: &'a str, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let ttl = millis(ttl).to_string();
            self.compare_and(&self.scripts.renew, key, lease, &[ttl.as_bytes()])
                .await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let record = Record::Completed {
                fingerprint: lease.fingerprint(),
                response: response.clone(),
            }
            .encode();
            let ttl = millis(ttl).to_string();
            self.compare_and(
                &self.scripts.complete,
                key,
                lease,
                &[&record, ttl.as_bytes()],
            )
            .await
        })
    }

    fn release<'a>(&'a self, key: &'a str, lease: &'a Lease) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.compare_and(&self.scripts.release, key, lease, &[])
                .await
        })
    }
}
