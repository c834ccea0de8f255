//! The client gRPC protocol, package `phxq.v1`.
//!
//! Everything here except the error conversions is generated at build time from
//! `proto/phxq/v1/phxq.proto`, the single source of truth and the protocol's reference
//! documentation: read it for what every message and field means. The server trait is
//! [`phxq_server::Phxq`] (mounted with [`phxq_server::PhxqServer`]), the client
//! [`phxq_client::PhxqClient`].
//!
//! Every response carries an `Error error` field: absent or code 0 means success. The codes
//! are [`ErrorCode`] numbers; [`error`] builds one, [`check`] and [`Error::failure`] read one.

use std::fmt;

use phxq_types::ErrorCode;

/// The generated code of `phxq.v1`. Its items are documented by the .proto comments.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("phxq.v1");
}

pub use generated::*;

/// The `Error` of a failed response with `code`, a human-readable `message`, and (with
/// [`ErrorCode::NotMaster`]) the master's client address, empty when unknown.
pub fn error(code: ErrorCode, message: impl Into<String>, master_addr: impl Into<String>) -> Error {
    Error {
        code: code.number(),
        name: code.name().to_string(),
        message: message.into(),
        master_addr: master_addr.into(),
    }
}

/// A failed call, as read from a response's `Error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The stable code; `None` when the number is one this build does not know (a newer
    /// server): treat it as not retryable.
    pub code: Option<ErrorCode>,
    /// The code's number as received (never 0).
    pub number: u32,
    /// The server's explanation, for people.
    pub message: String,
    /// With [`ErrorCode::NotMaster`]: the master's client address, when the server knows it.
    pub master_addr: Option<String>,
}

impl Failure {
    /// Whether retrying the same request (at `master_addr` for `NOT_MASTER`) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.code.is_some_and(ErrorCode::is_retryable)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code}")?,
            None => write!(f, "UNKNOWN({})", self.number)?,
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(master) = &self.master_addr {
            write!(f, " (master at {master})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

impl Error {
    /// The failure this `Error` reports, or `None` for success (code 0).
    pub fn failure(&self) -> Option<Failure> {
        if self.code == 0 {
            return None;
        }
        Some(Failure {
            code: ErrorCode::from_number(self.code),
            number: self.code,
            message: self.message.clone(),
            master_addr: (!self.master_addr.is_empty()).then(|| self.master_addr.clone()),
        })
    }
}

impl From<&Failure> for Error {
    fn from(failure: &Failure) -> Error {
        Error {
            code: failure.number,
            name: failure
                .code
                .map(|code| code.name().to_string())
                .unwrap_or_default(),
            message: failure.message.clone(),
            master_addr: failure.master_addr.clone().unwrap_or_default(),
        }
    }
}

/// `Ok` when a response's `error` says success (absent or code 0), else its [`Failure`].
pub fn check(error: Option<&Error>) -> Result<(), Failure> {
    match error.and_then(Error::failure) {
        None => Ok(()),
        Some(failure) => Err(failure),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication on the wire

/// The metadata key that carries a refusal's phxq code beside its gRPC status.
pub const ERROR_CODE_METADATA: &str = "phxq-error-code";

/// The gRPC status of a refusal that is no response body's: `UNAUTHENTICATED` (17) and
/// `PERMISSION_DENIED` (18) map to the gRPC codes of the same names, with the phxq number in
/// [`ERROR_CODE_METADATA`] and the message starting with the code (`PERMISSION_DENIED(18): ...`).
pub fn refusal_status(code: ErrorCode, message: impl fmt::Display) -> tonic::Status {
    let grpc = match code {
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
        _ => tonic::Code::FailedPrecondition,
    };
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(ERROR_CODE_METADATA, code.number().into());
    tonic::Status::with_metadata(grpc, format!("{code}: {message}"), metadata)
}

/// The phxq failure a gRPC status stands for: `UNAUTHENTICATED` and `PERMISSION_DENIED`
/// (from a phxq node or from anything in front of it); `None` for any other status.
pub fn status_failure(status: &tonic::Status) -> Option<Failure> {
    let code = match status.code() {
        tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
        tonic::Code::PermissionDenied => ErrorCode::PermissionDenied,
        _ => return None,
    };
    // The message of a phxq node already names the code; keep only its explanation.
    let prefix = format!("{code}: ");
    let message = status.message();
    Some(Failure {
        code: Some(code),
        number: code.number(),
        message: message.strip_prefix(&prefix).unwrap_or(message).to_string(),
        master_addr: None,
    })
}

/// A client-side interceptor that sends `authorization: Bearer <token>` on every call, or
/// nothing without a token. Cheap to clone (the header value is shared bytes).
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<tonic::metadata::AsciiMetadataValue>);

impl BearerToken {
    /// Sends `token` (`None`: no header). A token that cannot be a header value (not
    /// visible ASCII) is refused here, naming the problem, never sent mangled.
    pub fn new(token: Option<&str>) -> Result<BearerToken, String> {
        let Some(token) = token else {
            return Ok(BearerToken(None));
        };
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token is printable ASCII without spaces".to_string());
        }
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "a token is printable ASCII without spaces".to_string())?;
        Ok(BearerToken(Some(value)))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the phxq service over `channel` that sends `token` on every call.
pub type Client = phxq_client::PhxqClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// A [`Client`] over `channel` sending `token`.
pub fn client(channel: tonic::transport::Channel, token: BearerToken) -> Client {
    phxq_client::PhxqClient::with_interceptor(channel, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_the_wire_type() {
        for code in ErrorCode::ALL {
            let wire = error(code, "why", "");
            assert_eq!(wire.name, code.name());
            let failure = wire.failure().expect("a failure");
            assert_eq!(failure.code, Some(code));
            assert_eq!(failure.number, code.number());
            assert_eq!(failure.master_addr, None);
            assert_eq!(failure.is_retryable(), code.is_retryable());
            assert_eq!(Error::from(&failure), wire);
        }
        let not_master = error(ErrorCode::NotMaster, "ask n2", "10.0.0.2:7000");
        let failure = check(Some(&not_master)).expect_err("NOT_MASTER fails");
        assert_eq!(failure.master_addr.as_deref(), Some("10.0.0.2:7000"));
        assert_eq!(
            failure.to_string(),
            "NOT_MASTER(1): ask n2 (master at 10.0.0.2:7000)"
        );
    }

    #[test]
    fn the_proto_documents_every_error_code() {
        let proto = include_str!("../proto/phxq/v1/phxq.proto");
        for code in ErrorCode::ALL {
            let line = format!("// - {} {}: ", code.number(), code.name());
            assert!(proto.contains(&line), "phxq.proto lacks {line:?}");
        }
    }

    #[test]
    fn code_zero_or_absent_is_success_and_unknown_codes_are_not_retryable() {
        assert_eq!(check(None), Ok(()));
        assert_eq!(check(Some(&Error::default())), Ok(()));
        let future = Error {
            code: 9999,
            name: "FROM_THE_FUTURE".to_string(),
            ..Error::default()
        };
        let failure = check(Some(&future)).expect_err("a failure");
        assert_eq!(failure.code, None);
        assert!(!failure.is_retryable());
        assert_eq!(failure.to_string(), "UNKNOWN(9999)");
    }

    /// A tiny server that answers every call as a node that is not the master.
    struct NotMasterNode;

    #[tonic::async_trait]
    impl phxq_server::Phxq for NotMasterNode {
        async fn produce(
            &self,
            request: tonic::Request<ProduceRequest>,
        ) -> Result<tonic::Response<ProduceResponse>, tonic::Status> {
            let request = request.into_inner();
            Ok(tonic::Response::new(ProduceResponse {
                error: Some(error(
                    ErrorCode::NotMaster,
                    format!(
                        "{} messages for {}/{}",
                        request.messages.len(),
                        request.topic,
                        request.queue
                    ),
                    "127.0.0.1:1",
                )),
                ..ProduceResponse::default()
            }))
        }

        async fn produce_many(
            &self,
            request: tonic::Request<ProduceManyRequest>,
        ) -> Result<tonic::Response<ProduceManyResponse>, tonic::Status> {
            let request = request.into_inner();
            Ok(tonic::Response::new(ProduceManyResponse {
                error: Some(error(
                    ErrorCode::NotMaster,
                    format!("{} appends", request.appends.len()),
                    "127.0.0.1:1",
                )),
                ..ProduceManyResponse::default()
            }))
        }

        type ProduceStreamStream = std::pin::Pin<
            Box<
                dyn tonic::codegen::tokio_stream::Stream<
                        Item = Result<ProduceStreamResponse, tonic::Status>,
                    > + Send,
            >,
        >;

        async fn produce_stream(
            &self,
            _request: tonic::Request<tonic::Streaming<ProduceStreamRequest>>,
        ) -> Result<tonic::Response<Self::ProduceStreamStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn consume(
            &self,
            request: tonic::Request<ConsumeRequest>,
        ) -> Result<tonic::Response<ConsumeResponse>, tonic::Status> {
            let from = request.into_inner().from_offset.unwrap_or(1);
            Ok(tonic::Response::new(ConsumeResponse {
                messages: vec![StoredMessage {
                    offset: from,
                    time_ms: 5,
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                }],
                next_offset: from + 1,
                end_offset: from + 1,
                ..ConsumeResponse::default()
            }))
        }

        async fn commit(
            &self,
            _request: tonic::Request<CommitRequest>,
        ) -> Result<tonic::Response<CommitResponse>, tonic::Status> {
            Ok(tonic::Response::new(CommitResponse::default()))
        }

        async fn receive(
            &self,
            _request: tonic::Request<ReceiveRequest>,
        ) -> Result<tonic::Response<ReceiveResponse>, tonic::Status> {
            Ok(tonic::Response::new(ReceiveResponse {
                error: Some(error(ErrorCode::NotMaster, "receive", "127.0.0.1:1")),
                ..ReceiveResponse::default()
            }))
        }

        async fn ack(
            &self,
            _request: tonic::Request<AckRequest>,
        ) -> Result<tonic::Response<AckResponse>, tonic::Status> {
            Ok(tonic::Response::new(AckResponse {
                error: Some(error(ErrorCode::NotMaster, "ack", "127.0.0.1:1")),
                ..AckResponse::default()
            }))
        }

        async fn nack(
            &self,
            _request: tonic::Request<NackRequest>,
        ) -> Result<tonic::Response<NackResponse>, tonic::Status> {
            Ok(tonic::Response::new(NackResponse {
                error: Some(error(ErrorCode::NotMaster, "nack", "127.0.0.1:1")),
            }))
        }

        async fn offset_for_time(
            &self,
            request: tonic::Request<OffsetForTimeRequest>,
        ) -> Result<tonic::Response<OffsetForTimeResponse>, tonic::Status> {
            let request = request.into_inner();
            Ok(tonic::Response::new(OffsetForTimeResponse {
                error: Some(error(
                    ErrorCode::NotMaster,
                    format!("{}/{} at {}", request.topic, request.queue, request.time_ms),
                    "127.0.0.1:1",
                )),
                ..OffsetForTimeResponse::default()
            }))
        }

        async fn cluster_status(
            &self,
            _request: tonic::Request<ClusterStatusRequest>,
        ) -> Result<tonic::Response<ClusterStatusResponse>, tonic::Status> {
            Ok(tonic::Response::new(ClusterStatusResponse {
                store_id: 7,
                node_id: 1,
                groups_count: 3,
                ..ClusterStatusResponse::default()
            }))
        }

        async fn put_topic(
            &self,
            _request: tonic::Request<PutTopicRequest>,
        ) -> Result<tonic::Response<PutTopicResponse>, tonic::Status> {
            Ok(tonic::Response::new(PutTopicResponse {
                error: Some(error(ErrorCode::NotMaster, "topics", "127.0.0.1:1")),
                ..PutTopicResponse::default()
            }))
        }

        async fn delete_topic(
            &self,
            _request: tonic::Request<DeleteTopicRequest>,
        ) -> Result<tonic::Response<DeleteTopicResponse>, tonic::Status> {
            Ok(tonic::Response::new(DeleteTopicResponse {
                error: Some(error(ErrorCode::NotMaster, "topics", "127.0.0.1:1")),
            }))
        }

        async fn heartbeat(
            &self,
            _request: tonic::Request<HeartbeatRequest>,
        ) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
            Ok(tonic::Response::new(HeartbeatResponse {
                error: Some(error(ErrorCode::NotMaster, "group 0", "127.0.0.1:1")),
                ..HeartbeatResponse::default()
            }))
        }
    }

    #[tokio::test]
    async fn a_generated_client_talks_to_a_generated_server() {
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
            .expect("bind");
        let addr = incoming.local_addr().expect("local addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(phxq_server::PhxqServer::new(NotMasterNode))
                .serve_with_incoming(incoming),
        );
        let calls = async {
            let mut client = phxq_client::PhxqClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let produced = client
                .produce(ProduceRequest {
                    store_id: 0,
                    topic: "orders".to_string(),
                    queue: 3,
                    message_id: Vec::new(),
                    messages: vec![Message {
                        key: vec![],
                        value: b"hello".to_vec(),
                    }],
                })
                .await
                .expect("produce")
                .into_inner();
            let failure = check(produced.error.as_ref()).expect_err("not master");
            assert_eq!(failure.code, Some(ErrorCode::NotMaster));
            assert_eq!(failure.message, "1 messages for orders/3");
            assert_eq!(failure.master_addr.as_deref(), Some("127.0.0.1:1"));

            let consumed = client
                .consume(ConsumeRequest {
                    from_offset: Some(42),
                    ..ConsumeRequest::default()
                })
                .await
                .expect("consume")
                .into_inner();
            assert_eq!(check(consumed.error.as_ref()), Ok(()));
            assert_eq!(consumed.messages[0].offset, 42);
            assert_eq!(consumed.next_offset, 43);

            let sought = client
                .offset_for_time(OffsetForTimeRequest {
                    topic: "orders".to_string(),
                    queue: 2,
                    time_ms: 1_700_000_000_000,
                    store_id: 0,
                })
                .await
                .expect("offset_for_time")
                .into_inner();
            let failure = check(sought.error.as_ref()).expect_err("not master");
            assert_eq!(failure.message, "orders/2 at 1700000000000");

            let status = client
                .cluster_status(ClusterStatusRequest {})
                .await
                .expect("status")
                .into_inner();
            assert_eq!(
                (status.store_id, status.node_id, status.groups_count),
                (7, 1, 3)
            );
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), calls)
            .await
            .expect("round trip within 10 s");
        server.abort();
    }
}
