//! A TCP proxy the test controls, to cut and restore a connection to a real service.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct ToggleProxy {
    pub addr: SocketAddr,
    /// Cancelled to cut every connection of the current generation.
    generation: Arc<Mutex<Option<CancellationToken>>>,
    stop: CancellationToken,
}

impl ToggleProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let generation = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let stop = CancellationToken::new();
        tokio::spawn({
            let (generation, stop) = (generation.clone(), stop.clone());
            async move {
                loop {
                    let accepted = tokio::select! {
                        () = stop.cancelled() => break,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    let current = generation.lock().unwrap().clone();
                    // While cut, a new connection is accepted and dropped at once.
                    let Some(cut) = current else { continue };
                    tokio::spawn(pipe(client, upstream, cut));
                }
            }
        });
        Self {
            addr,
            generation,
            stop,
        }
    }

    /// Drops every open connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        if let Some(token) = self.generation.lock().unwrap().take() {
            token.cancel();
        }
    }

    pub fn restore(&self) {
        *self.generation.lock().unwrap() = Some(CancellationToken::new());
    }
}

impl Drop for ToggleProxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}

async fn pipe(mut client: TcpStream, upstream: SocketAddr, cut: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        () = cut.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}
