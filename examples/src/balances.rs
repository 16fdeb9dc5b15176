//! The account service's balance store: a Redis hash per deployment, with each debit and credit
//! applied atomically and at most once per (payment, operation) by a Lua script.

use std::collections::HashMap;

use redis::aio::ConnectionManager;

/// Why a balance operation failed.
#[derive(Debug)]
pub enum BalanceError {
    /// The account does not exist.
    NoAccount,
    /// The balance is lower than the amount.
    Insufficient {
        /// The balance.
        balance: i64,
    },
    /// Redis failed.
    Store(redis::RedisError),
}

impl std::fmt::Display for BalanceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoAccount => f.write_str("no such account"),
            Self::Insufficient { balance } => write!(f, "insufficient funds (balance {balance})"),
            Self::Store(e) => write!(f, "balance store: {e}"),
        }
    }
}

impl std::error::Error for BalanceError {}

/// The result of a debit or credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// The balance after the operation.
    pub balance: i64,
    /// False when this (payment, operation) had already been applied.
    pub applied: bool,
}

const MOVE: &str = r"
local done = redis.call('EXISTS', KEYS[2])
local bal = redis.call('HGET', KEYS[1], ARGV[1])
if not bal then return {0, -1} end
bal = tonumber(bal)
if done == 1 then return {bal, 0} end
local delta = tonumber(ARGV[2])
if delta < 0 and bal + delta < 0 then return {bal, -2} end
local nb = redis.call('HINCRBY', KEYS[1], ARGV[1], delta)
redis.call('SET', KEYS[2], '1', 'EX', 86400)
return {nb, 1}
";

/// Balances in Redis under `prefix`.
#[derive(Clone)]
pub struct Balances {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
}

impl std::fmt::Debug for Balances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balances")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Balances {
    /// Connects to `url`; keys start with `prefix`.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            script: redis::Script::new(MOVE),
        })
    }

    fn hash(&self) -> String {
        format!("{}:balances", self.prefix)
    }

    /// Answers a PING.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn ping(&self) -> Result<(), redis::RedisError> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(drop)
    }

    /// Opens `account` with `balance` unless it exists; returns its balance.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn open(&self, account: &str, balance: i64) -> Result<i64, redis::RedisError> {
        let mut c = self.conn.clone();
        let _: bool = redis::cmd("HSETNX")
            .arg(self.hash())
            .arg(account)
            .arg(balance)
            .query_async(&mut c)
            .await?;
        redis::cmd("HGET")
            .arg(self.hash())
            .arg(account)
            .query_async(&mut c)
            .await
    }

    /// Adds `delta` (negative: a debit, refused below zero) once per `op_id`.
    ///
    /// # Errors
    /// [`BalanceError`].
    pub async fn apply(
        &self,
        account: &str,
        delta: i64,
        op_id: &str,
    ) -> Result<Moved, BalanceError> {
        let mut c = self.conn.clone();
        let (balance, code): (i64, i64) = self
            .script
            .key(self.hash())
            .key(format!("{}:op:{op_id}", self.prefix))
            .arg(account)
            .arg(delta)
            .invoke_async(&mut c)
            .await
            .map_err(BalanceError::Store)?;
        match code {
            -1 => Err(BalanceError::NoAccount),
            -2 => Err(BalanceError::Insufficient { balance }),
            c => Ok(Moved {
                balance,
                applied: c == 1,
            }),
        }
    }

    /// The balances of `accounts` (all when empty).
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn balances(
        &self,
        accounts: &[String],
    ) -> Result<HashMap<String, i64>, redis::RedisError> {
        let mut c = self.conn.clone();
        let all: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.hash())
            .query_async(&mut c)
            .await?;
        Ok(if accounts.is_empty() {
            all
        } else {
            all.into_iter()
                .filter(|(k, _)| accounts.contains(k))
                .collect()
        })
    }

    /// Deletes every key under the prefix (the demo's clean-up).
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn delete_all(&self) -> Result<u64, redis::RedisError> {
        let mut c = self.conn.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut c)
            .await?;
        let mut n = 0;
        for chunk in keys.chunks(500) {
            n += redis::cmd("DEL")
                .arg(chunk)
                .query_async::<u64>(&mut c)
                .await?;
        }
        Ok(n)
    }
}
