//! `ledger`: consumes `PaymentCompleted` from Kafka, forwards a notification to RabbitMQ and
//! keeps running totals (`GET /totals`).
//!
//! Delivery is at-least-once: a redelivered event is forwarded again (the notification carries
//! the payment id as its idempotency key) but counted in the totals once. An event that does
//! not decode goes to the dead-letter topic with the reason; the rest keep flowing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use keel::App;
use keel::axum::extract::State;
use keel::axum::routing::get;
use keel::axum::{Json, Router};
use keel::messaging::{HandlerError, OutgoingMessage, Publisher, Received};
use keel_examples::{PaymentCompleted, Totals};

#[derive(Default)]
struct Books {
    totals: Totals,
    seen: HashSet<String>,
}

struct Ledger {
    books: Mutex<Books>,
    notify: Publisher,
    queue: String,
}

impl Ledger {
    async fn handle(&self, message: Received) -> Result<(), HandlerError> {
        let event: PaymentCompleted = serde_json::from_slice(&message.payload)
            .map_err(|e| HandlerError::permanent(format!("not a PaymentCompleted: {e}")))?;
        let text = format!(
            "payment {} of {} from {} to {} completed",
            event.payment_id, event.amount, event.from, event.to
        );
        let note = OutgoingMessage::new(self.queue.clone(), text.into_bytes())
            .with_header("idempotency-key", event.payment_id.clone());
        self.notify
            .send(note)
            .await
            .map_err(|e| HandlerError::retry(format!("notification not confirmed: {e}")))?;
        let mut books = self.books.lock().unwrap_or_else(PoisonError::into_inner);
        books.totals.events += 1;
        if books.seen.insert(event.payment_id.clone()) {
            let t = &mut books.totals;
            t.payments += 1;
            t.volume += event.amount;
            *t.net.entry(event.from).or_default() -= event.amount;
            *t.net.entry(event.to).or_default() += event.amount;
        }
        Ok(())
    }
}

async fn totals(State(ledger): State<Arc<Ledger>>) -> Json<Totals> {
    Json(
        ledger
            .books
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .totals
            .clone(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::from_config("ledger").await?;
    let notify = app.publisher("notifications").await?;
    let ledger = Arc::new(Ledger {
        books: Mutex::default(),
        notify,
        queue: app.destination("notifications"),
    });
    let routes = Router::new()
        .route("/totals", get(totals))
        .with_state(Arc::clone(&ledger));
    let handler = move |message: Received| {
        let ledger = Arc::clone(&ledger);
        async move { ledger.handle(message).await }
    };
    app.rest(routes)
        .consumer("payments", handler)?
        .run()
        .await?;
    Ok(())
}
