//! Frames on a byte stream: the length prefix, the size limit, postcard.

use lime_schemas::frame::{Frame, FrameError, MAX_HANDSHAKE_BYTES, PREFIX_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a peer's stream ended or was cut.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed, or closed in the middle of a frame.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are no frame: a bad length prefix or body.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// An unknown peer sent more than a hello can be (its length in bytes).
    #[error(
        "a handshake frame of {0} bytes (at most {MAX_HANDSHAKE_BYTES} before the peer is known)"
    )]
    HandshakeTooLarge(usize),
}

/// Reads one frame of the handshake, when the peer is not known yet: anything
/// larger than a hello is refused before a byte of it is read.
pub async fn read_handshake<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ReadError> {
    let Some(len) = read_len(r).await? else {
        return Ok(None);
    };
    if len > MAX_HANDSHAKE_BYTES {
        return Err(ReadError::HandshakeTooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(Frame::decode(&body)?))
}

/// Reads one frame; `Ok(None)` when the peer closed between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ReadError> {
    Ok(read_timed(r).await?.map(|(f, _)| f))
}

/// How a frame's bytes arrived: those that came after the first read of its body
/// (the ones a link had to carry while the reader waited) and how long they took.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Bytes of the body not yet there at the first read.
    pub bytes: usize,
    /// From the first read of the body to its last byte.
    pub took: std::time::Duration,
}

/// Reads one frame and times the arrival of its body.
pub async fn read_timed<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(Frame, Arrival)>, ReadError> {
    let Some(len) = read_len(r).await? else {
        return Ok(None);
    };
    // Grow as bytes arrive rather than trusting the prefix with one allocation.
    let mut body = Vec::with_capacity(len.min(1 << 20));
    let mut limited = r.take(len as u64);
    let first = read_some(&mut limited, &mut body).await?;
    let started = std::time::Instant::now();
    let rest = limited.read_to_end(&mut body).await?;
    let got = first + rest;
    if got != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame cut short: {got} of {len} bytes"),
        )
        .into());
    }
    let arrival = Arrival {
        bytes: rest,
        took: started.elapsed(),
    };
    Ok(Some((Frame::decode(&body)?, arrival)))
}

/// Reads a length prefix and checks it against the frame limit; `None` when
/// the peer closed between frames.
async fn read_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<usize>, ReadError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    match r.read_exact(&mut prefix).await {
        Ok(_) => Ok(Some(Frame::body_len(prefix)?)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One read's worth of bytes (what had already arrived), appended to `body`.
async fn read_some<R: AsyncRead + Unpin>(r: &mut R, body: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 64 << 10];
    let n = r.read(&mut chunk).await?;
    body.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Writes encoded frame bytes (from [`Frame::encode`]).
pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_schemas::Hello;

    #[tokio::test]
    async fn frames_cross_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let hello = Frame::Hello(Hello::new(3, "s0", [1; 32]));
        let bytes = hello.encode().unwrap();
        let writer = tokio::spawn(async move {
            write_bytes(&mut a, &bytes).await.unwrap();
        });
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(hello));
        writer.await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_large_frame_is_no_handshake() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(1u32 << 20).to_le_bytes()).await.unwrap();
        assert!(matches!(
            read_handshake(&mut b).await,
            Err(ReadError::HandshakeTooLarge(n)) if n == 1 << 20
        ));
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b).await,
            Err(ReadError::Frame(FrameError::TooLarge(_)))
        ));
    }
}
