//! Handlers registered per message type: one [`Handler`] that hands each message to the
//! handler of its type.
//!
//! A phxq message is a key and a value; what its *type* is belongs to the application (a key
//! prefix, a field of the value, a topic convention). So the type comes from a classifier the
//! caller gives ([`ByType::new`]), or the common convention [`ByType::key_prefix`]: the key up
//! to a separator (`order.paid:1234` is of type `order.paid`). One consumer reads one topic;
//! several topics are several consumers, each with its own [`ByType`].
//!
//! A message whose type has no handler goes to the fallback handler when there is one;
//! otherwise it is a failed delivery ([`Outcome::Nack`]): it goes through the retry tiers and
//! then to the dead-letter topic like any other failure, so a producer ahead of its consumers
//! (a new type) loses nothing and blocks nothing forever.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::consumer::{Delivery, Handler, Outcome};

type BoxedFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
type BoxedHandler = Box<dyn for<'a> Fn(&'a Delivery) -> BoxedFuture<'a> + Send + Sync>;
type Classifier = Box<dyn Fn(&Delivery) -> Option<String> + Send + Sync>;

/// A [`Handler`] dispatching on the message type (see the module documentation).
pub struct ByType {
    classify: Classifier,
    handlers: HashMap<String, BoxedHandler>,
    fallback: Option<BoxedHandler>,
}

impl ByType {
    /// Dispatches on the type `classify` gives a message (`None`: no type, the fallback's).
    pub fn new(classify: impl Fn(&Delivery) -> Option<String> + Send + Sync + 'static) -> ByType {
        ByType {
            classify: Box::new(classify),
            handlers: HashMap::new(),
            fallback: None,
        }
    }

    /// Dispatches on the key up to the first `separator` (a key without it, or not UTF-8 up
    /// to it, has no type).
    pub fn key_prefix(separator: char) -> ByType {
        ByType::new(move |delivery| {
            let key = std::str::from_utf8(&delivery.key).ok()?;
            key.split_once(separator)
                .map(|(message_type, _)| message_type.to_string())
        })
    }

    /// Handles messages of type `message_type` with `handler` (replacing an earlier one).
    pub fn on(mut self, message_type: impl Into<String>, handler: impl Handler) -> ByType {
        self.handlers.insert(message_type.into(), boxed(handler));
        self
    }

    /// Handles messages of no type or of a type without a handler with `handler`.
    pub fn otherwise(mut self, handler: impl Handler) -> ByType {
        self.fallback = Some(boxed(handler));
        self
    }

    /// The handler `delivery` goes to, if any.
    fn handler_of(&self, delivery: &Delivery) -> Option<&BoxedHandler> {
        (self.classify)(delivery)
            .and_then(|message_type| self.handlers.get(&message_type))
            .or(self.fallback.as_ref())
    }
}

impl Handler for ByType {
    fn handle(&self, msg: &Delivery) -> impl Future<Output = Outcome> + Send {
        let chosen = self.handler_of(msg).map(|handler| handler(msg));
        async move {
            match chosen {
                Some(handling) => handling.await,
                None => {
                    tracing::warn!(
                        topic = %msg.topic,
                        queue = msg.queue,
                        offset = msg.offset,
                        "no handler for the message's type; a failed delivery"
                    );
                    Outcome::Nack
                }
            }
        }
    }
}

fn boxed(handler: impl Handler) -> BoxedHandler {
    let handler = Arc::new(handler);
    Box::new(move |delivery| {
        let handler = handler.clone();
        Box::pin(async move { handler.handle(delivery).await })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn delivery(key: &str) -> Delivery {
        Delivery {
            topic: Arc::from("orders"),
            queue: 0,
            offset: 1,
            time_ms: 0,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            attempt: 1,
        }
    }

    /// Which handler saw which key, in order.
    type Seen = Arc<Mutex<Vec<(&'static str, Vec<u8>)>>>;

    /// A handler that records `name` and the key it saw, then answers `outcome`.
    fn recording(seen: &Seen, name: &'static str, outcome: Outcome) -> impl Handler {
        let seen = seen.clone();
        move |d: &Delivery| {
            seen.lock().unwrap().push((name, d.key.clone()));
            async move { outcome }
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn each_message_goes_to_its_types_handler_and_the_rest_to_the_fallback() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = ByType::key_prefix(':')
            .on(
                "order.created",
                recording(&seen, "created", Outcome::Handled),
            )
            .on("order.paid", recording(&seen, "paid", Outcome::Nack))
            .otherwise(recording(&seen, "other", Outcome::Handled));
        let outcomes: Vec<Outcome> = ["order.paid:1", "order.created:1", "refund:7", "no-type"]
            .iter()
            .map(|key| block_on(handler.handle(&delivery(key))))
            .collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Nack,
                Outcome::Handled,
                Outcome::Handled,
                Outcome::Handled
            ]
        );
        let names: Vec<&str> = seen.lock().unwrap().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["paid", "created", "other", "other"]);
    }

    #[test]
    fn without_a_fallback_an_unknown_type_is_a_failed_delivery() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = ByType::key_prefix(':').on("a", recording(&seen, "a", Outcome::Handled));
        assert_eq!(block_on(handler.handle(&delivery("b:1"))), Outcome::Nack);
        assert_eq!(block_on(handler.handle(&delivery("b"))), Outcome::Nack);
        assert_eq!(block_on(handler.handle(&delivery("a:1"))), Outcome::Handled);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_classifier_of_the_callers_decides_the_type() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        // The type in the value's first byte, say.
        let handler = ByType::new(|d| d.value.first().map(|b| format!("t{b}")))
            .on("t1", recording(&seen, "one", Outcome::Handled));
        let mut message = delivery("any");
        message.value = vec![1, 9];
        assert_eq!(block_on(handler.handle(&message)), Outcome::Handled);
        message.value = vec![2];
        assert_eq!(block_on(handler.handle(&message)), Outcome::Nack);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
