//! Frames on a byte stream: the length prefix, the size limit, postcard.

use lime_schemas::frame::{Frame, FrameError, PREFIX_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a peer's stream ended or was cut.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame; `Ok(None)` when the peer closed between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ReadError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = Frame::body_len(prefix)?;
    // Grow as bytes arrive rather than trusting the prefix with one allocation.
    let mut body = Vec::with_capacity(len.min(1 << 20));
    let got = r.take(len as u64).read_to_end(&mut body).await?;
    if got != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame cut short: {got} of {len} bytes"),
        )
        .into());
    }
    Ok(Some(Frame::decode(&body)?))
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
        let hello = Frame::Hello(Hello::new(3, "s0"));
        let bytes = hello.encode().unwrap();
        let writer = tokio::spawn(async move {
            write_bytes(&mut a, &bytes).await.unwrap();
        });
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(hello));
        writer.await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
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
