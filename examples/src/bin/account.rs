//! `account`: the gRPC account service. Run several instances; they share the balance store.
//!
//! Configuration: `keel.toml` / `KEEL_CONFIG` plus `KEEL_*` overrides (see `examples/config`);
//! `[app] redis` (default `redis://127.0.0.1:6379`) and `[app] prefix` (default `keel-payments`).

use keel::App;
use keel::prometheus_client::metrics::counter::Counter;
use keel_examples::balances::{BalanceError, Balances};
use keel_examples::proto::account_server::{Account, AccountServer};
use keel_examples::proto::{
    BalanceReply, BalancesReply, BalancesRequest, MoveRequest, OpenRequest,
};
use tonic::{Request, Response, Status};

struct AccountService {
    balances: Balances,
    already_applied: Counter,
}

fn status(e: BalanceError) -> Status {
    match e {
        BalanceError::NoAccount => Status::not_found("no such account"),
        BalanceError::Insufficient { balance } => {
            Status::failed_precondition(format!("insufficient funds (balance {balance})"))
        }
        BalanceError::Store(e) => Status::unavailable(format!("balance store: {e}")),
    }
}

fn validate(req: &MoveRequest) -> Result<(), Status> {
    if req.account.is_empty() || req.payment_id.is_empty() {
        return Err(Status::invalid_argument(
            "account and payment_id are required",
        ));
    }
    if req.amount <= 0 {
        return Err(Status::invalid_argument("amount must be positive"));
    }
    Ok(())
}

impl AccountService {
    async fn apply(
        &self,
        req: MoveRequest,
        sign: i64,
        op: &str,
    ) -> Result<Response<BalanceReply>, Status> {
        validate(&req)?;
        let moved = self
            .balances
            .apply(
                &req.account,
                sign * req.amount,
                &format!("{}:{op}", req.payment_id),
            )
            .await
            .map_err(status)?;
        if !moved.applied {
            self.already_applied.inc();
        }
        tracing::debug!(account = %req.account, op, amount = req.amount, applied = moved.applied, "moved");
        Ok(Response::new(BalanceReply {
            account: req.account,
            balance: moved.balance,
            applied: moved.applied,
        }))
    }
}

#[tonic::async_trait]
impl Account for AccountService {
    async fn open(&self, request: Request<OpenRequest>) -> Result<Response<BalanceReply>, Status> {
        let req = request.into_inner();
        if req.account.is_empty() || req.balance < 0 {
            return Err(Status::invalid_argument("account required, balance >= 0"));
        }
        let balance = self
            .balances
            .open(&req.account, req.balance)
            .await
            .map_err(|e| Status::unavailable(format!("balance store: {e}")))?;
        Ok(Response::new(BalanceReply {
            account: req.account,
            balance,
            applied: true,
        }))
    }

    async fn debit(&self, request: Request<MoveRequest>) -> Result<Response<BalanceReply>, Status> {
        self.apply(request.into_inner(), -1, "debit").await
    }

    async fn credit(
        &self,
        request: Request<MoveRequest>,
    ) -> Result<Response<BalanceReply>, Status> {
        self.apply(request.into_inner(), 1, "credit").await
    }

    async fn balances(
        &self,
        request: Request<BalancesRequest>,
    ) -> Result<Response<BalancesReply>, Status> {
        let balances = self
            .balances
            .balances(&request.into_inner().accounts)
            .await
            .map_err(|e| Status::unavailable(format!("balance store: {e}")))?;
        Ok(Response::new(BalancesReply {
            balances: balances.into_iter().collect(),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::from_config("account").await?;
    let redis = app
        .config()
        .app_str("redis")
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let prefix = app
        .config()
        .app_str("prefix")
        .unwrap_or_else(|| "keel-payments".to_owned());
    let balances = Balances::connect(&redis, &prefix).await?;
    let already_applied = app.metrics().counter(
        "account_already_applied",
        "Debits and credits not applied again because their payment had been applied",
    );
    let check = balances.clone();
    app.grpc_service(AccountServer::new(AccountService {
        balances,
        already_applied,
    }))
    .file_descriptor_set(keel_examples::proto::FILE_DESCRIPTOR_SET)
    .readiness_check("redis", move || {
        let check = check.clone();
        async move { check.ping().await.map_err(|e| e.to_string()) }
    })
    .run()
    .await?;
    Ok(())
}
