//! Loopback throughput of one streamed request body over mutual TLS 1.3 + HTTP/2.
//!
//! `cargo run --release -p understudy-transport --example throughput [MiB]` prints MiB/s for a
//! body of MiB mebibytes (default 2048) produced by a blocking thread through `BodyWriter`, as
//! a delta shipper would. A measurement, not a test: no assertion on time.

use std::io::Write;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::{Request, Response};
use understudy_transport as transport;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2048);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(mib))
}

async fn run(mib: u64) -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let make = |name: &str| -> Result<transport::TlsContext, transport::TransportError> {
        let dir = tmp.path().join(name);
        let id = transport::load_or_create(&dir.join("identity"), name, &[])?;
        transport::TlsContext::new(id, transport::TrustStore::open(&dir.join("trust"))?)
    };
    let (a, b) = (make("a")?, make("b")?);
    let pem = tmp.path().join("a.pem");
    std::fs::write(&pem, a.identity().ca_pem())?;
    b.add_trust(&pem)?;
    std::fs::write(&pem, b.identity().ca_pem())?;
    a.add_trust(&pem)?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(transport::serve(
        listener,
        a,
        |req: Request<hyper::body::Incoming>, _peer| async move {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(d) = frame.into_data() {
                    n += d.len() as u64;
                }
            }
            Response::new(transport::full(n.to_string()))
        },
        std::future::pending(),
    ));
    let peer = transport::Peer::new(addr.to_string(), b)?;
    peer.get_json("/warmup").await?;

    let total = mib << 20;
    let (tx, body) = transport::body_channel(transport::DEFAULT_BODY_CHANNEL_CHUNKS);
    let start = Instant::now();
    let producer = std::thread::spawn(move || -> std::io::Result<()> {
        let block = vec![0x5au8; 1 << 20];
        let mut w = transport::BodyWriter::new(tx);
        for _ in 0..(total >> 20) {
            w.write_all(&block)?;
        }
        w.finish()
    });
    let resp = peer.request(Request::post("/upload").body(body)?).await?;
    let got = transport::read_body(peer.addr(), resp.into_body(), 64).await?;
    let secs = start.elapsed().as_secs_f64();
    producer.join().map_err(|_| "producer panicked")??;
    println!(
        "{} MiB in {secs:.2} s = {:.0} MiB/s (server counted {} bytes)",
        mib,
        mib as f64 / secs,
        String::from_utf8_lossy(&got)
    );
    Ok(())
}
