//! The `ProduceStream` call: many Produces over one HTTP/2 stream.
//!
//! A unary `Produce` costs an HTTP/2 stream per message: its headers (HPACK), a task on the
//! server, the response's headers and trailers. On a two-core machine, with one message per
//! call, that was the largest share of the node's CPU after the fsyncs. A stream pays it
//! once; each message is then one DATA frame each way.
//!
//! Each request is checked and handed to the node as a unary Produce would be, **in stream
//! order**: [`NodeHandle::submit`] queues it before the next request is read, so requests
//! for one queue are admitted, proposed and appended in the order they were sent. Their
//! answers are awaited concurrently ([`IN_FLIGHT_MAX`] requests and [`WINDOW_BYTES_MAX`]
//! bytes of messages at most; the stream is not read beyond that, which holds the client
//! back through HTTP/2 flow control) and sent as they come. A request read while the window
//! is full waits, unsubmitted, until answers free enough of it (alone in an empty window it
//! always goes), so a stream's order holds. When the client closes its side, the call ends
//! after the last answer; when it goes away, answers still owed are dropped (their writes
//! may still commit: at least once, as a unary call cancelled mid-flight). A malformed
//! request frame stops the reading too, and the call ends with its error status after the
//! answers owed. When the node stops, open streams stop reading and end once their answers
//! are sent, so a graceful stop does not wait for idle streams to be closed by their
//! clients.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use phxq_proto::api;
use phxq_types::ErrorCode;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::Caller;
use super::{NodeHandle, bounded, produce_refused, produce_request, produce_response, refuse};
use crate::auth::Action;
use crate::config::ServerConfig;

/// Requests of one stream awaiting their answers at most.
pub const IN_FLIGHT_MAX: usize = 256;
/// Bytes of keys and values of one stream's requests awaiting their answers at most (16 MiB):
/// 256 requests of 32 MiB each would be 8 GiB per stream.
pub const WINDOW_BYTES_MAX: u64 = 16 << 20;

/// The answers of one `ProduceStream` call, as tonic sends them.
pub(super) type Answers = ReceiverStream<Result<api::ProduceStreamResponse, tonic::Status>>;

/// An answer to come, with the bytes of messages it holds in the window.
type Answer = Pin<Box<dyn Future<Output = (api::ProduceStreamResponse, u64)> + Send>>;

/// Serves `requests` on a task of its own; returns the stream of their answers.
pub(super) fn serve(
    caller: Caller,
    config: Arc<ServerConfig>,
    handle: NodeHandle,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    mut requests: tonic::Streaming<api::ProduceStreamRequest>,
) -> Answers {
    let (answers_tx, answers_rx) = tokio::sync::mpsc::channel(IN_FLIGHT_MAX);
    tokio::spawn(async move {
        let mut in_flight: FuturesUnordered<Answer> = FuturesUnordered::new();
        let mut window_bytes = 0;
        // A request read while the window was full, waiting for room.
        let mut waiting: Option<api::ProduceStreamRequest> = None;
        let mut reading = true;
        let mut failed = None;
        loop {
            if let Some(request) = waiting.take_if(|r| fits(window_bytes, request_bytes(r))) {
                window_bytes += request_bytes(&request);
                in_flight.push(admit(&caller, &config, &handle, request));
            }
            let room = waiting.is_none() && in_flight.len() < IN_FLIGHT_MAX;
            tokio::select! {
                next = requests.next(), if reading && room => {
                    match next {
                        Some(Ok(request)) => waiting = Some(request),
                        // A malformed frame or a reset ends the reading, not the answers
                        // still owed.
                        Some(Err(status)) => (reading, failed) = (false, Some(status)),
                        None => reading = false,
                    }
                }
                // Raised (or its sender gone): the node is stopping. The receiver is a clone
                // of one that never marks values seen, so a stop raised before this stream
                // began counts as a change too.
                _ = stopping.changed(), if reading => reading = false,
                Some((answer, bytes)) = in_flight.next(), if !in_flight.is_empty() => {
                    window_bytes -= bytes;
                    if answers_tx.send(Ok(answer)).await.is_err() {
                        return; // The client went away.
                    }
                }
                else => break,
            }
        }
        if let Some(status) = failed {
            let _ = answers_tx.send(Err(status)).await;
        }
    });
    ReceiverStream::new(answers_rx)
}

/// Whether a request of `bytes` fits in a window holding `window_bytes` (one always fits in
/// an empty window).
fn fits(window_bytes: u64, bytes: u64) -> bool {
    window_bytes == 0 || window_bytes + bytes <= WINDOW_BYTES_MAX
}

/// Bytes of keys and values a stream request carries.
fn request_bytes(request: &api::ProduceStreamRequest) -> u64 {
    let messages = request.request.iter().flat_map(|r| &r.messages);
    messages.map(|m| (m.key.len() + m.value.len()) as u64).sum()
}

/// Checks `request` and, when it passes, hands it to the node now; the future of its answer.
fn admit(
    caller: &Caller,
    config: &Arc<ServerConfig>,
    handle: &NodeHandle,
    request: api::ProduceStreamRequest,
) -> Answer {
    let id = request.id;
    let bytes = request_bytes(&request);
    let checked = match request.request {
        None => Err(refuse(
            ErrorCode::InvalidArgument,
            "a ProduceStreamRequest without its request",
        )),
        // The stream's token was verified when it opened; each request's topic is checked
        // here, and a refusal is that request's answer.
        Some(produce) => caller
            .check_wire(Action::Produce {
                topic: &produce.topic,
            })
            .and_then(|()| produce_request(config, produce)),
    };
    match checked {
        Err(error) => {
            let response = Some(produce_refused(error));
            Box::pin(async move { (api::ProduceStreamResponse { id, response }, bytes) })
        }
        Ok(request) => {
            let answer = handle.submit(request);
            let config = config.clone();
            Box::pin(async move {
                let response = Some(produce_response(&config, bounded(answer, 0).await));
                (api::ProduceStreamResponse { id, response }, bytes)
            })
        }
    }
}
