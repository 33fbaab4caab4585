//! Raw HTTP/1.1 on a socket, for the tests and benches that must control what goes on the
//! wire (pipelining: several requests in one write): reading one answer.

use anyhow::bail;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};

/// Reads one answer off `stream`: its status code and body (read by its Content-Length).
/// An error if the peer closed the connection before the status line.
pub async fn read_answer(
    stream: &mut (impl AsyncBufRead + Unpin),
) -> anyhow::Result<(u16, String)> {
    let mut status = String::new();
    if stream.read_line(&mut status).await? == 0 {
        bail!("the server closed the connection");
    }
    let Some(code) = status.split(' ').nth(1).and_then(|c| c.parse().ok()) else {
        bail!("not an HTTP status line: {:?}", status.trim());
    };
    let mut line = String::new();
    let mut length = 0;
    loop {
        line.clear();
        stream.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    Ok((code, String::from_utf8(body)?))
}
