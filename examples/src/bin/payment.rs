//! `payment`: the REST payment service.
//!
//! `POST /payments {from,to,amount,idempotency_key}` (also send the key as the
//! `Idempotency-Key` header: Keel's idempotency layer then answers a repeat from its store)
//! debits `from` and credits `to` on the `account` service through Keel's gRPC client, each call
//! carrying its own idempotency key, then publishes `PaymentCompleted` (confirmed by Kafka)
//! before answering `201`. Every step is safe to repeat, so a caller that gets no answer retries
//! with the same key. `GET /payments/{id}` reports a payment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use keel::App;
use keel::axum::extract::{Path, State};
use keel::axum::http::StatusCode;
use keel::axum::response::{IntoResponse, Response};
use keel::axum::routing::{get, post};
use keel::axum::{Extension, Json, Router};
use keel::breaker::deadline::Deadline;
use keel::client::GrpcChannel;
use keel::messaging::Publisher;
use keel_examples::proto::MoveRequest;
use keel_examples::proto::account_client::AccountClient;
use keel_examples::{Payment, PaymentCompleted, PaymentRequest};

struct Payments {
    accounts: AccountClient<GrpcChannel>,
    events: Publisher,
    topic: String,
    done: Mutex<HashMap<String, Payment>>,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

/// A gRPC call carrying the idempotency key `key` and the incoming deadline.
fn call(req: MoveRequest, key: String, deadline: Option<Deadline>) -> tonic::Request<MoveRequest> {
    let mut r = tonic::Request::new(req);
    if let Ok(v) = key.parse() {
        r.metadata_mut().insert("idempotency-key", v);
    }
    if let Some(d) = deadline {
        r.extensions_mut().insert(d);
    }
    r
}

async fn create(
    State(s): State<Arc<Payments>>,
    deadline: Option<Extension<Deadline>>,
    Json(req): Json<PaymentRequest>,
) -> Response {
    if req.amount <= 0 || req.from.is_empty() || req.to.is_empty() || req.from == req.to {
        return error(
            StatusCode::BAD_REQUEST,
            "from, to (different) and a positive amount are required",
        );
    }
    if req.idempotency_key.is_empty() || req.idempotency_key.len() > 200 {
        return error(
            StatusCode::BAD_REQUEST,
            "idempotency_key is required (at most 200 bytes)",
        );
    }
    let deadline = deadline.map(|Extension(d)| d);
    let id = req.idempotency_key.clone();
    let mut accounts = s.accounts.clone();
    let debit = MoveRequest {
        account: req.from.clone(),
        amount: req.amount,
        payment_id: id.clone(),
    };
    match accounts
        .debit(call(debit, format!("{id}:debit"), deadline))
        .await
    {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            let payment = Payment {
                id: id.clone(),
                from: req.from,
                to: req.to,
                amount: req.amount,
                status: "declined".to_owned(),
            };
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(payment)).into_response();
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, status.message());
        }
        // The debit may or may not have happened: 502, not 503 (which callers read as "not
        // executed" and may replay without a key). The caller retries with the same key, and
        // the retry's debit is not applied twice.
        Err(status) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("debit: {}", status.message()),
            );
        }
    }
    let credit = MoveRequest {
        account: req.to.clone(),
        amount: req.amount,
        payment_id: id.clone(),
    };
    if let Err(status) = accounts
        .credit(call(credit, format!("{id}:credit"), deadline))
        .await
    {
        return error(
            StatusCode::BAD_GATEWAY,
            format!("credit: {}", status.message()),
        );
    }
    let event = PaymentCompleted {
        payment_id: id.clone(),
        from: req.from.clone(),
        to: req.to.clone(),
        amount: req.amount,
    };
    let payload = match serde_json::to_vec(&event) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let message = keel::messaging::OutgoingMessage::new(s.topic.clone(), payload)
        .with_key(req.from.clone())
        .with_header("idempotency-key", id.clone())
        .with_header("content-type", "application/json");
    if let Err(e) = s.events.send(message).await {
        return error(StatusCode::BAD_GATEWAY, format!("event not confirmed: {e}"));
    }
    let payment = Payment {
        id: id.clone(),
        from: req.from,
        to: req.to,
        amount: req.amount,
        status: "completed".to_owned(),
    };
    s.done
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, payment.clone());
    (StatusCode::CREATED, Json(payment)).into_response()
}

async fn read(State(s): State<Arc<Payments>>, Path(id): Path<String>) -> Response {
    let found = s
        .done
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .cloned();
    match found {
        Some(p) => Json(p).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such payment"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::from_config("payment").await?;
    let channel = app.grpc("account")?;
    let accounts = AccountClient::new(channel.clone());
    let events = app.publisher("payments").await?;
    let state = Arc::new(Payments {
        accounts,
        events,
        topic: app.destination("payments"),
        done: Mutex::default(),
    });
    let routes = Router::new()
        .route("/payments", post(create))
        .route("/payments/{id}", get(read))
        .with_state(state);
    app.rest(routes)
        .readiness_check("account discovered", move || {
            let found = !channel.endpoints().is_empty();
            async move {
                if found {
                    Ok(())
                } else {
                    Err("no account instance yet".to_owned())
                }
            }
        })
        .run()
        .await?;
    Ok(())
}
