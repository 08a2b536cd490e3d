//! MQTT packets as the gate sees them: whole frames cut from a byte stream, and
//! the few kinds it looks inside (CONNECT, PUBLISH, SUBSCRIBE) decoded and
//! re-encoded with rumqttc's codecs for 3.1.1 and 5. Every other packet passes
//! through as the bytes that came.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const CONNECT: u8 = 1;
pub const PUBLISH: u8 = 3;
pub const PUBREL: u8 = 6;
pub const SUBSCRIBE: u8 = 8;

/// One packet, fixed header included.
#[derive(Debug)]
pub struct Frame {
    pub bytes: BytesMut,
    header_len: usize,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.bytes[0] >> 4
    }

    /// A PUBLISH's topic, read from its variable header without decoding the
    /// rest (`None` for other packets, or a topic that is not UTF-8).
    pub fn publish_topic(&self) -> Option<&str> {
        if self.kind() != PUBLISH {
            return None;
        }
        let at = self.header_len;
        let len = self.bytes.get(at..at + 2)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        std::str::from_utf8(self.bytes.get(at + 2..at + 2 + len)?).ok()
    }

    /// Whether a PUBLISH asks to be retained.
    pub fn retains(&self) -> bool {
        self.kind() == PUBLISH && self.bytes[0] & 1 == 1
    }

    /// The packet identifier at the start of the variable header (PUBREL, acks).
    pub fn leading_pkid(&self) -> Option<u16> {
        let b = self.bytes.get(self.header_len..self.header_len + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Reads one packet; `Ok(None)` when the stream ends between packets. A packet
/// declaring more than `max` bytes is refused before anything is allocated for it.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Option<Frame>> {
    match r.read_u8().await {
        Ok(first) => read_rest(first, r, max).await.map(Some),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a connection's first packet, which must be a CONNECT: anything else
/// (a stray HTTP request, a port scan) is refused at its first byte, without
/// waiting for the length it seems to declare.
pub async fn read_connect<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<Frame>> {
    match r.read_u8().await {
        Ok(first) if first == CONNECT << 4 => read_rest(first, r, max).await.map(Some),
        Ok(_) => Err(invalid("a first packet that is not CONNECT")),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

async fn read_rest<R: AsyncRead + Unpin>(first: u8, r: &mut R, max: usize) -> io::Result<Frame> {
    let mut header = [first, 0, 0, 0, 0];
    let mut header_len = 1;
    let mut remaining = 0usize;
    loop {
        if header_len == header.len() {
            return Err(invalid("a remaining length longer than 4 bytes"));
        }
        let b = r.read_u8().await?;
        header[header_len] = b;
        remaining |= usize::from(b & 0x7f) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = header_len + remaining;
    if total > max {
        return Err(invalid(&format!(
            "a packet of {total} bytes, over the limit of {max}"
        )));
    }
    let mut bytes = BytesMut::zeroed(total);
    bytes[..header_len].copy_from_slice(&header[..header_len]);
    r.read_exact(&mut bytes[header_len..]).await?;
    Ok(Frame { bytes, header_len })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn malformed(e: impl std::fmt::Debug) -> io::Error {
    invalid(&format!("a malformed packet: {e:?}"))
}

/// The MQTT version a client connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

/// A client's CONNECT (boxed: one per connection, and the v5 one is large).
#[derive(Debug)]
pub enum Connect {
    V4(Box<v4::Connect>),
    V5(Box<(v5::Connect, Option<v5::LastWill>, Option<v5::Login>)>),
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadLogin,
    NotAuthorized,
}

impl Connect {
    pub fn parse(mut frame: Frame, max: usize) -> io::Result<Self> {
        if frame.kind() != CONNECT {
            return Err(invalid("a first packet that is not CONNECT"));
        }
        // The protocol level follows the protocol name, a two-byte length and
        // "MQTT".
        let level = frame.bytes.get(frame.header_len + 6).copied();
        match level {
            Some(4) => match v4::Packet::read(&mut frame.bytes, max).map_err(malformed)? {
                v4::Packet::Connect(c) => Ok(Connect::V4(Box::new(c))),
                _ => Err(invalid("a first packet that is not CONNECT")),
            },
            Some(5) => {
                match v5::Packet::read(&mut frame.bytes, Some(max as u32)).map_err(malformed)? {
                    v5::Packet::Connect(c, will, login) => {
                        Ok(Connect::V5(Box::new((c, will, login))))
                    }
                    _ => Err(invalid("a first packet that is not CONNECT")),
                }
            }
            _ => Err(invalid("an MQTT version other than 3.1.1 and 5")),
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            Connect::V4(_) => Protocol::V4,
            Connect::V5(_) => Protocol::V5,
        }
    }

    pub fn client_id(&self) -> &str {
        match self {
            Connect::V4(c) => &c.client_id,
            Connect::V5(c) => &c.0.client_id,
        }
    }

    /// Gives the session another client id (rumqttd keys sessions by it).
    pub fn set_client_id(&mut self, id: String) {
        match self {
            Connect::V4(c) => c.client_id = id,
            Connect::V5(c) => c.0.client_id = id,
        }
    }

    /// Username and password, if the client gave a username.
    pub fn login(&self) -> Option<(&str, &str)> {
        match self {
            Connect::V4(c) => c
                .login
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_str())),
            Connect::V5(c) => {
                c.2.as_ref()
                    .map(|l| (l.username.as_str(), l.password.as_str()))
            }
        }
    }

    pub fn has_will(&self) -> bool {
        match self {
            Connect::V4(c) => c.last_will.is_some(),
            Connect::V5(c) => c.1.is_some(),
        }
    }

    /// The same CONNECT under another login (the gate's own, for rumqttd).
    pub fn encode_with_login(mut self, username: &str, password: &str) -> io::Result<BytesMut> {
        let mut out = BytesMut::new();
        match &mut self {
            Connect::V4(c) => {
                c.set_login(username, password);
                c.write(&mut out).map_err(malformed)?;
            }
            Connect::V5(c) => {
                let (connect, will, login) = &mut **c;
                *login = Some(v5::Login::new(username, password));
                connect.write(will, login, &mut out).map_err(malformed)?;
            }
        }
        Ok(out)
    }
}

/// The CONNACK that refuses a connection.
pub fn connack_refused(protocol: Protocol, why: Refusal) -> BytesMut {
    let mut out = BytesMut::new();
    let written = match protocol {
        Protocol::V4 => v4::ConnAck::new(
            match why {
                Refusal::BadLogin => v4::ConnectReturnCode::BadUserNamePassword,
                Refusal::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
            },
            false,
        )
        .write(&mut out)
        .is_ok(),
        Protocol::V5 => v5::ConnAck {
            session_present: false,
            code: match why {
                Refusal::BadLogin => v5::ConnectReturnCode::BadUserNamePassword,
                Refusal::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: None,
        }
        .write(&mut out)
        .is_ok(),
    };
    debug_assert!(written, "a CONNACK always encodes");
    out
}

/// A client's PUBLISH.
#[derive(Debug)]
pub enum Publish {
    V4(v4::Publish),
    V5(v5::Publish),
}

impl Publish {
    pub fn parse(mut frame: Frame, protocol: Protocol, max: usize) -> io::Result<Self> {
        match protocol {
            Protocol::V4 => match v4::Packet::read(&mut frame.bytes, max).map_err(malformed)? {
                v4::Packet::Publish(p) => Ok(Publish::V4(p)),
                _ => Err(invalid("not a PUBLISH")),
            },
            Protocol::V5 => {
                match v5::Packet::read(&mut frame.bytes, Some(max as u32)).map_err(malformed)? {
                    v5::Packet::Publish(p) => Ok(Publish::V5(p)),
                    _ => Err(invalid("not a PUBLISH")),
                }
            }
        }
    }

    /// The topic as written, which is empty when a v5 client sends only an alias.
    pub fn topic(&self) -> Result<&str, std::str::Utf8Error> {
        match self {
            Publish::V4(p) => Ok(&p.topic),
            Publish::V5(p) => std::str::from_utf8(&p.topic),
        }
    }

    pub fn alias(&self) -> Option<u16> {
        match self {
            Publish::V4(_) => None,
            Publish::V5(p) => p.properties.as_ref().and_then(|p| p.topic_alias),
        }
    }

    /// QoS as a number, and the packet id (0 at QoS 0).
    pub fn qos_and_pkid(&self) -> (u8, u16) {
        match self {
            Publish::V4(p) => (p.qos as u8, p.pkid),
            Publish::V5(p) => (p.qos as u8, p.pkid),
        }
    }

    pub fn retains(&self) -> bool {
        match self {
            Publish::V4(p) => p.retain,
            Publish::V5(p) => p.retain,
        }
    }

    /// Re-encoded under `topic` written out in full (no topic alias), retained
    /// or not.
    pub fn encode_under(mut self, topic: String, retain: bool) -> io::Result<BytesMut> {
        let mut out = BytesMut::new();
        match &mut self {
            Publish::V4(p) => {
                p.topic = topic;
                p.retain = retain;
                p.write(&mut out).map_err(malformed)?;
            }
            Publish::V5(p) => {
                p.topic = Bytes::from(topic);
                p.retain = retain;
                if let Some(props) = &mut p.properties {
                    props.topic_alias = None;
                }
                p.write(&mut out).map_err(malformed)?;
            }
        }
        Ok(out)
    }
}

/// The answer to a PUBLISH the gate does not pass on: v5 clients learn why;
/// MQTT 3.1.1 has no way to say so, and gets the plain acknowledgement the
/// standard allows (the publish is dropped). `None` at QoS 0.
pub fn publish_refused(protocol: Protocol, qos: u8, pkid: u16, why: &str) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    let reason = || Some(why.to_owned());
    let written = match (protocol, qos) {
        (_, 0) => return None,
        (Protocol::V4, 1) => v4::PubAck::new(pkid).write(&mut out).is_ok(),
        (Protocol::V4, _) => v4::PubRec::new(pkid).write(&mut out).is_ok(),
        (Protocol::V5, 1) => v5::PubAck {
            pkid,
            reason: v5::PubAckReason::NotAuthorized,
            properties: Some(v5::PubAckProperties {
                reason_string: reason(),
                user_properties: Vec::new(),
            }),
        }
        .write(&mut out)
        .is_ok(),
        (Protocol::V5, _) => v5::PubRec {
            pkid,
            reason: v5::PubRecReason::NotAuthorized,
            properties: Some(v5::PubRecProperties {
                reason_string: reason(),
                user_properties: Vec::new(),
            }),
        }
        .write(&mut out)
        .is_ok(),
    };
    written.then_some(out)
}

/// Completes an MQTT 3.1.1 QoS 2 exchange for a publish that was dropped.
pub fn pubcomp(pkid: u16) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    v4::PubComp::new(pkid).write(&mut out).ok().map(|_| out)
}

/// A client's SUBSCRIBE: its packet id and filters.
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

impl Subscribe {
    pub fn parse(mut frame: Frame, protocol: Protocol, max: usize) -> io::Result<Self> {
        match protocol {
            Protocol::V4 => match v4::Packet::read(&mut frame.bytes, max).map_err(malformed)? {
                v4::Packet::Subscribe(s) => Ok(Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| f.path).collect(),
                }),
                _ => Err(invalid("not a SUBSCRIBE")),
            },
            Protocol::V5 => {
                match v5::Packet::read(&mut frame.bytes, Some(max as u32)).map_err(malformed)? {
                    v5::Packet::Subscribe(s) => Ok(Subscribe {
                        pkid: s.pkid,
                        filters: s.filters.into_iter().map(|f| f.path).collect(),
                    }),
                    _ => Err(invalid("not a SUBSCRIBE")),
                }
            }
        }
    }

    /// The SUBACK that refuses every filter.
    pub fn refused(&self, protocol: Protocol, why: &str) -> Option<BytesMut> {
        let mut out = BytesMut::new();
        let n = self.filters.len();
        let written = match protocol {
            Protocol::V4 => v4::SubAck::new(self.pkid, vec![v4::SubscribeReasonCode::Failure; n])
                .write(&mut out)
                .is_ok(),
            Protocol::V5 => v5::SubAck {
                pkid: self.pkid,
                return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; n],
                properties: Some(v5::SubAckProperties {
                    reason_string: Some(why.to_owned()),
                    user_properties: Vec::new(),
                }),
            }
            .write(&mut out)
            .is_ok(),
        };
        written.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(bytes: &[u8], max: usize) -> io::Result<Vec<Frame>> {
        let mut r = bytes;
        let mut out = Vec::new();
        while let Some(f) = read_frame(&mut r, max).await? {
            out.push(f);
        }
        Ok(out)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn frames_are_cut_at_packet_boundaries_and_capped() {
        let mut stream = BytesMut::new();
        let mut publish =
            v4::Publish::new("a/b", rumqttc::mqttbytes::QoS::AtLeastOnce, vec![7u8; 300]);
        publish.pkid = 1;
        publish.write(&mut stream).unwrap();
        let one = stream.len();
        stream.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        let got = block_on(frames(&stream, 1024)).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind(), PUBLISH);
        assert_eq!(got[0].bytes.len(), one);
        assert_eq!(&got[1].bytes[..], &[0xc0, 0x00]);
        let err = block_on(frames(&stream, 100)).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        // A remaining length that never ends is refused, not read on.
        let err = block_on(frames(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f], 1 << 30)).unwrap_err();
        assert!(err.to_string().contains("longer than 4 bytes"), "{err}");
        // A stream cut inside a packet is an error, between packets the end.
        assert!(block_on(frames(&stream[..one - 1], 1024)).is_err());
    }

    #[test]
    fn a_connect_gets_another_login_and_keeps_the_rest() {
        let mut c = v4::Connect::new("robot-1");
        c.set_login("robot-1", "pw");
        c.keep_alive = 33;
        let mut bytes = BytesMut::new();
        c.write(&mut bytes).unwrap();
        let frame = block_on(frames(&bytes, 1024)).unwrap().remove(0);
        let parsed = Connect::parse(frame, 1024).unwrap();
        assert_eq!(parsed.protocol(), Protocol::V4);
        assert_eq!(parsed.login(), Some(("robot-1", "pw")));
        let out = parsed.encode_with_login("gate", "secret").unwrap();
        let frame = block_on(frames(&out, 1024)).unwrap().remove(0);
        let Connect::V4(again) = Connect::parse(frame, 1024).unwrap() else {
            panic!("not v4")
        };
        assert_eq!(again.keep_alive, 33);
        assert_eq!(again.client_id, "robot-1");
        assert_eq!(again.login.unwrap().username, "gate");
    }

    #[test]
    fn a_v5_request_is_moved_without_its_alias_or_retain_flag() {
        let mut p = v5::Publish::new("", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "{}", None);
        p.pkid = 9;
        p.retain = true;
        p.properties = Some(v5::PublishProperties {
            topic_alias: Some(3),
            response_topic: Some("lime/response/r/x".into()),
            ..Default::default()
        });
        let mut bytes = BytesMut::new();
        p.write(&mut bytes).unwrap();
        let frame = block_on(frames(&bytes, 1024)).unwrap().remove(0);
        let parsed = Publish::parse(frame, Protocol::V5, 1024).unwrap();
        assert_eq!(parsed.alias(), Some(3));
        assert_eq!(parsed.topic().unwrap(), "");
        assert_eq!(parsed.qos_and_pkid(), (1, 9));
        assert!(parsed.retains());
        let mut out = parsed.encode_under("lime/request/r".into(), false).unwrap();
        let v5::Packet::Publish(again) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(&again.topic[..], b"lime/request/r");
        assert!(!again.retain);
        let props = again.properties.unwrap();
        assert_eq!(props.topic_alias, None);
        assert_eq!(props.response_topic.as_deref(), Some("lime/response/r/x"));
    }
}
