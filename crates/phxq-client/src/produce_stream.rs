//! Single-queue produces over `ProduceStream`: one multiplexed stream per node.
//!
//! A unary `Produce` pays an HTTP/2 stream per call (headers both ways, trailers, a task on
//! the server). A producer that sends one message at a time pays it per message; over a
//! stream each produce is one DATA frame each way, which the store's benchmark measured as
//! about a third less server CPU per message and half the client's.
//!
//! * **One stream per node**, shared by every request of the producer (and its clones) to
//!   that node; requests carry an id, a reader task hands each answer to its waiter.
//! * **Same meaning as a unary `Produce`**: the answer is the `ProduceResponse` the node
//!   would have given, so routing, redirects and retries (`router.rs`) are unchanged.
//! * **A broken stream fails its waiters** with the status that broke it (a transport
//!   failure, retried like a lost connection) and is replaced on the next request. A waiter
//!   that gives up (its attempt timed out) is forgotten; its late answer is dropped.
//! * **Order**: requests are sent in the order their callers reached the stream, and the
//!   node admits them in stream order; a caller that awaits each answer before its next
//!   request keeps per-key order exactly as with unary calls.
//! * A node that does not serve `ProduceStream` (`UNIMPLEMENTED`, an older build) is
//!   remembered and called with unary `Produce` from then on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use phxq_proto::api;
use tokio::sync::{mpsc, oneshot};

/// Requests queued for one stream's sender at most (the server keeps 256 in flight).
const QUEUED_MAX: usize = 256;

type Reply = oneshot::Sender<Result<api::ProduceResponse, tonic::Status>>;

/// The producer's streams, by node address.
#[derive(Default)]
pub(crate) struct Streams {
    by_node: Mutex<HashMap<String, Arc<NodeStream>>>,
    /// Nodes that answered `UNIMPLEMENTED` to `ProduceStream`.
    unary: Mutex<HashSet<String>>,
}

/// One open stream to a node.
struct NodeStream {
    requests: mpsc::Sender<api::ProduceStreamRequest>,
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    next_id: u64,
    replies: HashMap<u64, Reply>,
    /// Why the stream ended, once it did.
    ended: Option<tonic::Status>,
}

impl Streams {
    /// `request` produced at `addr` over its stream (opened first if need be), or over a
    /// unary call where streams are not served.
    pub(crate) async fn produce(
        &self,
        mut client: api::Client,
        addr: &str,
        request: api::ProduceRequest,
    ) -> Result<api::ProduceResponse, tonic::Status> {
        if lock(&self.unary).contains(addr) {
            return Ok(client.produce(request).await?.into_inner());
        }
        let stream = match self.stream(&mut client, addr).await {
            Ok(stream) => stream,
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                lock(&self.unary).insert(addr.to_string());
                return Ok(client.produce(request).await?.into_inner());
            }
            Err(status) => return Err(status),
        };
        let (id, answer) = {
            let mut waiting = lock(&stream.waiting);
            if let Some(ended) = &waiting.ended {
                let ended = ended.clone();
                drop(waiting);
                self.forget(addr, &stream);
                return Err(ended);
            }
            waiting.next_id += 1;
            let id = waiting.next_id;
            let (reply, answer) = oneshot::channel();
            waiting.replies.insert(id, reply);
            (id, answer)
        };
        // Forgets the waiter if this future is dropped before its answer (a timed-out
        // attempt), so the map never holds replies nobody waits for.
        let _forget = Forget {
            waiting: &stream.waiting,
            id,
        };
        let sent = stream.requests.send(api::ProduceStreamRequest {
            id,
            request: Some(request),
        });
        if sent.await.is_err() {
            self.forget(addr, &stream);
            return Err(tonic::Status::unavailable("the produce stream closed"));
        }
        let result = answer
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the produce stream ended")));
        if result.is_err() {
            self.forget(addr, &stream);
        }
        result
    }

    /// The open stream to `addr`, or a new one.
    async fn stream(
        &self,
        client: &mut api::Client,
        addr: &str,
    ) -> Result<Arc<NodeStream>, tonic::Status> {
        if let Some(stream) = lock(&self.by_node).get(addr)
            && lock(&stream.waiting).ended.is_none()
        {
            return Ok(stream.clone());
        }
        let (requests, outgoing) = mpsc::channel(QUEUED_MAX);
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let answers = client.produce_stream(outgoing).await?.into_inner();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(read_answers(answers, waiting.clone()));
        let stream = Arc::new(NodeStream { requests, waiting });
        // Two callers may open one at once; the later replaces the earlier in the map, and
        // the earlier ends once its own waiters are answered and it is dropped.
        lock(&self.by_node).insert(addr.to_string(), stream.clone());
        Ok(stream)
    }

    /// Drops `stream` from the map if it is still the one there.
    fn forget(&self, addr: &str, stream: &Arc<NodeStream>) {
        let mut by_node = lock(&self.by_node);
        if by_node
            .get(addr)
            .is_some_and(|current| Arc::ptr_eq(current, stream))
        {
            by_node.remove(addr);
        }
    }
}

/// Hands each answer of a stream to its waiter; when the stream ends, fails the rest.
async fn read_answers(
    mut answers: tonic::Streaming<api::ProduceStreamResponse>,
    waiting: Arc<Mutex<Waiting>>,
) {
    let ended = loop {
        match answers.message().await {
            Ok(Some(answer)) => {
                let reply = lock(&waiting).replies.remove(&answer.id);
                if let Some(reply) = reply {
                    let response = answer
                        .response
                        .ok_or_else(|| tonic::Status::internal("an answer without a response"));
                    let _ = reply.send(response);
                }
            }
            Ok(None) => break tonic::Status::unavailable("the produce stream ended"),
            Err(status) => break status,
        }
    };
    let mut waiting = lock(&waiting);
    for (_, reply) in waiting.replies.drain() {
        let _ = reply.send(Err(ended.clone()));
    }
    waiting.ended = Some(ended);
}

struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.waiting).replies.remove(&self.id);
    }
}

/// Locks `mutex`; every critical section here is a few map operations, consistent even
/// after a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
