//! Answers DNS queries from the zone over UDP and TCP (hickory's server does the framing,
//! truncation and FORMERR); names outside the zone go to the upstream server, or are refused.
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use hickory_server::{
    net::{runtime::Time, xfer::Protocol},
    proto::{
        op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode},
        rr::{DNSClass, LowerName, Record, RecordType},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tracing::debug;

use super::{
    forward,
    zone::{Lookup, NameRecords, Zone},
};

pub type SharedZone = Arc<RwLock<Zone>>;

/// How many aliases inside the zone an answer follows (an ExternalName naming another
/// Service's name).
const MAX_ALIASES: usize = 8;

#[derive(Clone)]
pub struct Handler {
    pub zone: SharedZone,
    pub upstream: Option<SocketAddr>,
}

/// The sections of an answer from the zone.
struct Answer {
    code: ResponseCode,
    /// The names whose records answer, in order (a name, then what its alias names).
    chain: Vec<Arc<NameRecords>>,
    /// The zone's SOA, for negative answers.
    apex: Option<Arc<NameRecords>>,
}

impl Handler {
    /// Whether the answer comes from the zone, without waiting on the upstream server.
    pub fn answers_locally(&self, request: &Request) -> bool {
        let Some(_) = self.upstream else { return true };
        let Ok(info) = request.request_info() else {
            return true;
        };
        let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
        zone.lookup(info.query.name()) != Lookup::Elsewhere
    }

    fn answer(&self, name: &LowerName, qtype: RecordType) -> Option<Answer> {
        let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
        let mut chain = Vec::new();
        let mut next = name.clone();
        loop {
            match zone.lookup(&next) {
                Lookup::Elsewhere if chain.is_empty() => return None,
                // An alias out of the zone: the client resolves the target.
                Lookup::Elsewhere => break,
                _ if !zone.ready() => {
                    return Some(Answer {
                        code: ResponseCode::ServFail,
                        chain,
                        apex: None,
                    });
                }
                Lookup::NxDomain if chain.is_empty() => {
                    return Some(Answer {
                        code: ResponseCode::NXDomain,
                        chain,
                        apex: Some(zone.apex()),
                    });
                }
                Lookup::NxDomain => break,
                Lookup::Name(records) => {
                    let target = records
                        .alias()
                        .filter(|_| qtype != RecordType::CNAME && qtype != RecordType::ANY)
                        .map(LowerName::new);
                    chain.push(records);
                    match target {
                        Some(target) if chain.len() < MAX_ALIASES => next = target,
                        _ => break,
                    }
                }
            }
        }
        let found = chain.iter().any(|r| r.answer(qtype).next().is_some());
        Some(Answer {
            code: ResponseCode::NoError,
            apex: (!found).then(|| zone.apex()),
            chain,
        })
    }

    /// Sends `request` to the upstream server as it came, over the protocol it came by.
    async fn forward(&self, upstream: SocketAddr, request: &Request) -> Option<Message> {
        let tcp = request.protocol() == Protocol::Tcp;
        match forward::exchange(upstream, request.as_slice(), tcp).await {
            Ok(bytes) => match Message::from_vec(&bytes) {
                Ok(message) => Some(message),
                Err(e) => {
                    debug!(%upstream, "upstream answer unreadable: {e}");
                    None
                }
            },
            Err(e) => {
                debug!(%upstream, "upstream: {e}");
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let response_edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &response_edns {
            builder.edns(edns);
        }
        let mut base = Metadata::response_from_request(&request.metadata);
        base.recursion_available = self.upstream.is_some();
        let refuse = |code| {
            let mut metadata = base;
            metadata.response_code = code;
            metadata
        };
        let query = match request.request_info() {
            _ if request.edns.as_ref().is_some_and(|e| e.version() > 0) => {
                Err(ResponseCode::BADVERS)
            }
            _ if request.metadata.op_code != OpCode::Query => Err(ResponseCode::NotImp),
            Ok(info) if info.query.query_class() != DNSClass::IN => Err(ResponseCode::Refused),
            Ok(info) => Ok(info.query),
            Err(_) => Err(ResponseCode::FormErr),
        };
        let no_records = || std::iter::empty::<&Record>();
        let sent = 'sent: {
            let code = match query {
                Err(code) => code,
                Ok(query) => match self.answer(query.name(), query.query_type()) {
                    Some(answer) => {
                        let qtype = query.query_type();
                        let mut metadata = base;
                        metadata.authoritative = answer.code != ResponseCode::ServFail;
                        metadata.response_code = answer.code;
                        let with_targets = matches!(qtype, RecordType::SRV | RecordType::ANY);
                        break 'sent response
                            .send_response(
                                builder.build(
                                    metadata,
                                    answer.chain.iter().flat_map(|r| r.answer(qtype)),
                                    no_records(),
                                    answer.apex.iter().flat_map(|a| a.records.iter()),
                                    answer
                                        .chain
                                        .iter()
                                        .filter(|_| with_targets)
                                        .flat_map(|r| r.additionals.iter()),
                                ),
                            )
                            .await;
                    }
                    None => match self.upstream {
                        None => ResponseCode::Refused,
                        Some(upstream) => match self.forward(upstream, request).await {
                            None => ResponseCode::ServFail,
                            Some(message) => {
                                let mut metadata = message.metadata;
                                metadata.id = request.metadata.id;
                                break 'sent response
                                    .send_response(builder.build(
                                        metadata,
                                        message.answers.iter(),
                                        message.authorities.iter(),
                                        no_records(),
                                        message.additionals.iter(),
                                    ))
                                    .await;
                            }
                        },
                    },
                },
            };
            response
                .send_response(builder.build(
                    refuse(code),
                    no_records(),
                    no_records(),
                    no_records(),
                    no_records(),
                ))
                .await
        };
        sent.unwrap_or_else(|e| {
            debug!("sending a DNS answer: {e}");
            ResponseInfo::from(Header {
                metadata: refuse(ResponseCode::ServFail),
                counts: HeaderCounts::default(),
            })
        })
    }
}
