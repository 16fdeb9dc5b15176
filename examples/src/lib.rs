//! A payments system built only on Keel's public API: three services and a demo driver.
//!
//! - `account` (gRPC, several instances): balances, debits and credits. Balances live in Redis
//!   (an in-memory store shared by every instance) so that an instance killed with SIGKILL loses
//!   nothing; each debit or credit is applied at most once per payment, atomically.
//! - `payment` (REST): `POST /payments {from,to,amount,idempotency_key}` debits and credits
//!   through Keel's gRPC client (discovery, balancing, breaker, budgeted retry) with idempotency
//!   keys, then publishes `PaymentCompleted` to Kafka; `GET /payments/{id}`.
//! - `ledger`: consumes `PaymentCompleted`, forwards a notification to RabbitMQ, keeps running
//!   totals (`GET /totals`).
//! - `demo`: starts everything, drives payments while killing and restarting account instances,
//!   and checks that the ledger's totals equal the balances.
//!
//! ```no_run
//! use keel_examples::proto::account_client::AccountClient;
//!
//! # async fn example() -> Result<(), keel::Error> {
//! let app = keel::App::from_config("payment").await?;
//! let accounts = AccountClient::new(app.grpc("account")?);
//! # drop(accounts); Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

pub mod balances;

/// The generated protobuf types and gRPC client and server of `keel.payments.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("keel.payments.v1");

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/payments_descriptor.bin"));
}

/// The body of `POST /payments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// The account debited.
    pub from: String,
    /// The account credited.
    pub to: String,
    /// Minor units, > 0.
    pub amount: i64,
    /// The caller's key: a retry with the same key never pays twice.
    pub idempotency_key: String,
}

/// A payment as `payment` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The payment id (the idempotency key).
    pub id: String,
    /// The account debited.
    pub from: String,
    /// The account credited.
    pub to: String,
    /// Minor units.
    pub amount: i64,
    /// `completed` or `declined`.
    pub status: String,
}

/// The event `payment` publishes once a payment has moved the money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCompleted {
    /// The payment id.
    pub payment_id: String,
    /// The account debited.
    pub from: String,
    /// The account credited.
    pub to: String,
    /// Minor units.
    pub amount: i64,
}

/// What `GET /totals` on the ledger reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Events consumed (redeliveries included).
    pub events: u64,
    /// Distinct payments applied.
    pub payments: u64,
    /// Sum of the amounts of the distinct payments.
    pub volume: i64,
    /// Net change per account (credits minus debits).
    pub net: std::collections::BTreeMap<String, i64>,
}
