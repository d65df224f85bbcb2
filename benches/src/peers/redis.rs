//! A minimal Redis client (RESP2 over one TCP connection): commands in, replies out, with
//! pipelining (write many commands, then read as many replies). Enough to drive GET and SET
//! like a gateway's denylist lookup would; kept small so the benchmark build stays light.

use anyhow::{bail, Context};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Longest bulk reply accepted (the benchmark's values are a few bytes).
const BULK_BYTES_MAX: usize = 1 << 20;
/// Most elements in an array reply accepted.
const ARRAY_LEN_MAX: usize = 1 << 16;

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

pub struct Redis {
    addr: SocketAddr,
    /// `None` after a failure: replies may be left unread or half read, so the next call
    /// connects again rather than read them as its own.
    conn: Option<Conn>,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect to redis at {addr}"))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Conn { reader: BufReader::new(r), writer: BufWriter::new(w) })
    }
}

impl Redis {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Redis> {
        Ok(Redis { addr, conn: Some(Conn::open(addr).await?) })
    }

    /// Sends every command, then reads one reply per command. An error reply is returned as
    /// [`Reply::Error`], not as `Err` (which means the connection failed; the next call uses a
    /// new one).
    pub async fn pipeline(&mut self, commands: &[Vec<&[u8]>]) -> anyhow::Result<Vec<Reply>> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn::open(self.addr).await?,
        };
        let replies = conn.pipeline(commands).await?;
        self.conn = Some(conn);
        Ok(replies)
    }

    /// One command, its reply; an error reply is an `Err`.
    pub async fn call(&mut self, args: Vec<&[u8]>) -> anyhow::Result<Reply> {
        match self.pipeline(&[args]).await?.pop() {
            Some(Reply::Error(e)) => bail!("redis: {e}"),
            Some(reply) => Ok(reply),
            None => bail!("redis: no reply"),
        }
    }
}

impl Conn {
    async fn pipeline(&mut self, commands: &[Vec<&[u8]>]) -> anyhow::Result<Vec<Reply>> {
        for args in commands {
            self.writer.write_all(format!("*{}\r\n", args.len()).as_bytes()).await?;
            for arg in args {
                self.writer.write_all(format!("${}\r\n", arg.len()).as_bytes()).await?;
                self.writer.write_all(arg).await?;
                self.writer.write_all(b"\r\n").await?;
            }
        }
        self.writer.flush().await?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = Vec::new();
        let n = self.reader.read_until(b'\n', &mut line).await?;
        if n == 0 {
            bail!("redis closed the connection");
        }
        if !line.ends_with(b"\r\n") {
            bail!("redis: a reply line without CRLF");
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).context("redis: a reply line that is not UTF-8")
    }

    async fn read_reply(&mut self) -> anyhow::Result<Reply> {
        // Arrays nest; read them iteratively with an explicit stack.
        let mut stack: Vec<(usize, Vec<Reply>)> = Vec::new();
        loop {
            let line = self.line().await?;
            // By byte: a line starting with a multi-byte character is an unknown type, not a panic.
            let kind = line.as_bytes().first().copied().unwrap_or(b' ');
            let rest = line.get(1..).unwrap_or_default();
            let mut reply = match kind {
                b'+' => Reply::Status(rest.to_owned()),
                b'-' => Reply::Error(rest.to_owned()),
                b':' => Reply::Int(rest.parse().context("redis: integer reply")?),
                b'$' => {
                    let len: i64 = rest.parse().context("redis: bulk length")?;
                    if len < 0 {
                        Reply::Bulk(None)
                    } else {
                        let len = usize::try_from(len)?;
                        if len > BULK_BYTES_MAX {
                            bail!("redis: a bulk reply of {len} bytes (limit {BULK_BYTES_MAX})");
                        }
                        let mut data = vec![0; len + 2];
                        self.reader.read_exact(&mut data).await?;
                        if !data.ends_with(b"\r\n") {
                            bail!("redis: a bulk reply of {len} bytes not followed by CRLF");
                        }
                        data.truncate(len);
                        Reply::Bulk(Some(data))
                    }
                }
                b'*' => {
                    let len: i64 = rest.parse().context("redis: array length")?;
                    if len <= 0 {
                        Reply::Array(Vec::new())
                    } else {
                        let len = usize::try_from(len)?;
                        if len > ARRAY_LEN_MAX {
                            bail!("redis: an array reply of {len} elements (limit {ARRAY_LEN_MAX})");
                        }
                        stack.push((len, Vec::with_capacity(len)));
                        continue;
                    }
                }
                other => bail!("redis: unknown reply type {:?}", other as char),
            };
            // Put the finished reply into its array, closing every array it completes.
            loop {
                let Some((want, items)) = stack.last_mut() else { return Ok(reply) };
                items.push(reply);
                if items.len() < *want {
                    break;
                }
                let (_, items) = stack.pop().expect("non-empty stack");
                reply = Reply::Array(items);
            }
        }
    }
}
