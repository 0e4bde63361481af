//! The self-test's and `--watch`'s blocking client: URLs, plain and TLS connections with
//! timeouts, one HTTP/1.1 request at a time, and websockets over either.
//!
//! This is a command-line tool, not the server: plain `std::net` sockets with timeouts,
//! rustls (ring provider, already linked for MySQL) for https, and tungstenite's sync
//! client. Every read is bounded ([`MAX_ANSWER_BYTES`]).
//!
//! Trust roots for https, in this order: the system's CA bundle (`SSL_CERT_FILE`, else
//! the usual Debian, Red Hat, SUSE and Alpine paths), else Mozilla's roots compiled in
//! (webpki-roots: the container image has no CA files); plus `--ca-file`. `--insecure`
//! checks no certificate at all, and every line it affects says so.

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// The most of an answer (head and body) that is read; the rest is ignored.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Connect, read and write timeout of every socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// CA bundles of the common distributions, tried in order.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path prefix without a trailing slash ("" for the root).
    pub prefix: String,
}

impl Url {
    /// Parses `http[s]://host[:port][/prefix]`; a trailing `/notification` is dropped, so
    /// both Seafile's `SERVICE_URL` and its `NOTIFICATION_SERVER_URL` work.
    pub fn parse(text: &str) -> Result<Url, String> {
        let text = text.trim();
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{text:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{text:?}: unclosed ["))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("{text:?}: {p:?} is not a port"))?,
            None => default_port,
        };
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
        let prefix = path.strip_suffix("/notification").unwrap_or(path).to_string();
        Ok(Url {
            tls,
            host,
            port,
            prefix,
        })
    }

    /// `https://host[:port]/prefix`, as the admin would type it.
    pub fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.host_header(), self.prefix)
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The URL of a server's own address (`host:port` from the configuration).
    pub fn local(addr: SocketAddr) -> Url {
        Url {
            tls: false,
            host: addr.ip().to_string(),
            port: addr.port(),
            prefix: String::new(),
        }
    }
}

/// How https connections are checked.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    /// Where the trust roots came from, for the output.
    pub roots: String,
    pub insecure: bool,
}

impl Tls {
    /// Trust roots as the module documentation says; `ca_file` adds certificates,
    /// `insecure` checks none.
    pub fn new(ca_file: Option<&std::path::Path>, insecure: bool) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        if insecure {
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerifier(provider)))
                .with_no_client_auth();
            return Ok(Tls {
                config: Arc::new(config),
                roots: "none: --insecure, certificates are not checked".into(),
                insecure: true,
            });
        }
        let candidates = std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(CA_BUNDLES.iter().map(std::path::PathBuf::from));
        let (mut store, mut roots) = system_roots(candidates);
        if let Some(path) = ca_file {
            let certs = load_pem(path)?;
            if certs.is_empty() {
                return Err(format!("--ca-file {}: no PEM certificates in it", path.display()));
            }
            let (added, _) = store.add_parsable_certificates(certs);
            roots.push_str(&format!(" and --ca-file {} ({added})", path.display()));
        }
        let config = builder.with_root_certificates(store).with_no_client_auth();
        Ok(Tls {
            config: Arc::new(config),
            roots,
            insecure: false,
        })
    }
}

/// The first CA bundle among `candidates` that exists and holds certificates, else the
/// roots compiled in; and where they came from, for the output.
fn system_roots(mut candidates: impl Iterator<Item = std::path::PathBuf>) -> (rustls::RootCertStore, String) {
    let mut store = rustls::RootCertStore::empty();
    let system = candidates.find(|p| p.is_file());
    let roots = match system.as_deref().map(|p| (p, load_pem(p))) {
        Some((path, Ok(certs))) if !certs.is_empty() => {
            let (added, _) = store.add_parsable_certificates(certs);
            format!("the system's CA bundle {} ({added} certificates)", path.display())
        }
        _ => {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            "Mozilla's CA certificates built into this program (no CA bundle on this system)".into()
        }
    };
    (store, roots)
}

fn load_pem(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))
}

/// `--insecure`: accepts any certificate, still checks the handshake's signatures.
#[derive(Debug)]
struct NoVerifier(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The name does not resolve.
    Resolve(String),
    /// TCP: refused, unreachable, timed out.
    Tcp(SocketAddr, std::io::Error),
    /// The TLS handshake failed: certificate, name, protocol.
    Tls(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Resolve(e) => write!(f, "cannot resolve the name: {e}"),
            ConnectError::Tcp(addr, e) => write!(f, "cannot connect to {addr}: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

/// A plain or TLS connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// Connects to `url`'s host and port (TLS when https), with [`IO_TIMEOUT`].
    pub fn connect(url: &Url, tls: &Tls) -> Result<Stream, ConnectError> {
        let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| ConnectError::Resolve(e.to_string()))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(ConnectError::Tcp(addr, e)),
            }
        }
        let mut tcp = match tcp {
            Some(s) => s,
            None => return Err(last.unwrap_or_else(|| ConnectError::Resolve("no address".into()))),
        };
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
        let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
        if !url.tls {
            return Ok(Stream::Plain(tcp));
        }
        let name = ServerName::try_from(url.host.clone()).map_err(|e| ConnectError::Tls(e.to_string()))?;
        let mut conn =
            rustls::ClientConnection::new(tls.config.clone(), name).map_err(|e| ConnectError::Tls(e.to_string()))?;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut tcp) {
                let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                return Err(ConnectError::Tls(match inner {
                    Some(tls_error) => describe_tls_error(tls_error),
                    None => e.to_string(),
                }));
            }
        }
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

/// A TLS error in the admin's words.
fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the certificate is not signed by a trusted CA (self-signed, or the chain is incomplete)".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the certificate is not valid for this host name".into()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the certificate is not valid yet (check the clock)".into()
        }
        rustls::Error::InvalidCertificate(other) => format!("invalid certificate: {other:?}"),
        other => other.to_string(),
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One HTTP answer, its body cut at [`MAX_ANSWER_BYTES`].
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the body looks like a web page (seahub, or a proxy's error page).
    pub fn is_html(&self) -> bool {
        self.header("content-type").is_some_and(|t| t.contains("html"))
            || self.text().trim_start().to_ascii_lowercase().starts_with("<!doctype")
            || self.text().trim_start().to_ascii_lowercase().starts_with("<html")
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum RequestError {
    Connect(ConnectError),
    /// Connected, but the answer did not come or was not HTTP.
    Io(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Connect(e) => e.fmt(f),
            RequestError::Io(e) => f.write_str(e),
        }
    }
}

/// Sends one request (`Connection: close`) to `url` plus `path` and reads the answer.
pub fn request(
    url: &Url,
    tls: &Tls,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, RequestError> {
    let mut s = Stream::connect(url, tls).map_err(RequestError::Connect)?;
    let mut raw = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: notification-server-self-test\r\nConnection: close\r\n",
        url.prefix,
        url.host_header()
    );
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)
        .and_then(|()| s.flush())
        .map_err(|e| RequestError::Io(format!("sending the request: {e}")))?;
    read_answer(&mut s)
}

/// Reads one answer until the body is complete, the peer closes, or the cap.
fn read_answer(s: &mut impl Read) -> Result<Answer, RequestError> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(answer) = parse_answer(&all)? {
            return Ok(answer);
        }
        if all.len() >= MAX_ANSWER_BYTES {
            return parse_answer_at_eof(&all);
        }
        match s.read(&mut buf) {
            Ok(0) => return parse_answer_at_eof(&all),
            Ok(n) => all.extend_from_slice(buf.get(..n).unwrap_or_default()),
            // A TLS peer that closes without close_notify: what came is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return parse_answer_at_eof(&all),
            Err(e) if all.is_empty() => return Err(RequestError::Io(format!("no answer: {e}"))),
            Err(_) => return parse_answer_at_eof(&all),
        }
    }
}

/// The answer in `data` if it is complete (head, and a Content-Length or chunked body).
fn parse_answer(data: &[u8]) -> Result<Option<Answer>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(RequestError::Io(format!(
                "the answer is not HTTP ({e}): {:?}",
                String::from_utf8_lossy(data.get(..data.len().min(80)).unwrap_or_default())
            )));
        }
    };
    let mut answer = Answer {
        status: resp.code.unwrap_or(0),
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
        body: Vec::new(),
    };
    let rest = data.get(head_len..).unwrap_or_default();
    if answer.status == 101 || answer.status == 204 || answer.status == 304 {
        return Ok(Some(answer));
    }
    if let Some(len) = answer
        .header("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        let want = len.min(MAX_ANSWER_BYTES);
        if rest.len() >= want {
            answer.body = rest.get(..want).unwrap_or_default().to_vec();
            return Ok(Some(answer));
        }
        return Ok(None);
    }
    if answer
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        if let Some(body) = dechunk(rest) {
            answer.body = body;
            return Ok(Some(answer));
        }
        return Ok(None);
    }
    Ok(None)
}

fn parse_answer_at_eof(data: &[u8]) -> Result<Answer, RequestError> {
    if let Some(a) = parse_answer(data)? {
        return Ok(a);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(data) {
        Ok(httparse::Status::Complete(n)) => Ok(Answer {
            status: resp.code.unwrap_or(0),
            headers: resp
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
            body: data.get(n..).unwrap_or_default().to_vec(),
        }),
        _ if data.is_empty() => Err(RequestError::Io("the connection was closed without an answer".into())),
        _ => Err(RequestError::Io("the answer was cut off".into())),
    }
}

/// The body of a complete chunked encoding, or None while it is incomplete.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(data.get(..eol)?).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(eol + 2..eol + 2 + size)?);
        data = data.get(eol + 2 + size + 2..)?;
        if out.len() >= MAX_ANSWER_BYTES {
            return Some(out);
        }
    }
}

/// Why a websocket did not open.
#[derive(Debug)]
pub enum WsError {
    Connect(ConnectError),
    /// The server answered, but not with 101.
    Refused(Answer),
    Other(String),
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::Connect(e) => e.fmt(f),
            WsError::Refused(a) => write!(f, "answered {} instead of upgrading", a.status),
            WsError::Other(e) => f.write_str(e),
        }
    }
}

/// Opens a websocket at `url` plus `path`.
pub fn websocket(url: &Url, tls: &Tls, path: &str) -> Result<tungstenite::WebSocket<Stream>, WsError> {
    let stream = Stream::connect(url, tls).map_err(WsError::Connect)?;
    let scheme = if url.tls { "wss" } else { "ws" };
    let target = format!("{scheme}://{}{}{path}", url.host_header(), url.prefix);
    match tungstenite::client::client(target.as_str(), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let (parts, body) = resp.into_parts();
            Err(WsError::Refused(Answer {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect(),
                body: body.unwrap_or_default(),
            }))
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(WsError::Other(e.to_string())),
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err(WsError::Other("the handshake timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://seafile.example.com/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.prefix.as_str()),
            (true, "seafile.example.com", 443, "")
        );
        assert_eq!(u.base(), "https://seafile.example.com");
        let u = Url::parse("http://10.0.0.1:8000/seafile/notification").unwrap();
        assert_eq!((u.port, u.prefix.as_str()), (8000, "/seafile"));
        assert_eq!(u.host_header(), "10.0.0.1:8000");
        let u = Url::parse("https://[::1]:8443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.base(), "https://[::1]:8443");
        assert!(Url::parse("seafile.example.com").is_err());
        assert!(Url::parse("https://:80").is_err());
        assert!(Url::parse("https://h:x").is_err());
    }

    #[test]
    fn without_a_ca_bundle_the_compiled_in_roots_are_used() {
        // As in the container image: none of the paths exists.
        let (store, roots) = system_roots(["/nonexistent/ca.pem"].into_iter().map(std::path::PathBuf::from));
        assert!(store.len() > 100, "{}", store.len());
        assert!(roots.contains("built into this program"), "{roots}");
        // An empty file is no bundle either.
        let empty = std::env::temp_dir().join(format!("ns-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&empty, "").unwrap();
        let (_, roots) = system_roots([empty.clone()].into_iter());
        assert!(roots.contains("built into this program"), "{roots}");
        std::fs::remove_file(&empty).unwrap();
    }

    #[test]
    fn answers_with_length_chunks_or_eof() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong")
            .unwrap()
            .unwrap();
        assert_eq!((a.status, a.text().as_str()), (200, "pong"));
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npong")
                .unwrap()
                .is_none()
        );
        let a = parse_answer(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((a.status, a.text().as_str()), (404, "abc"));
        let a = parse_answer_at_eof(b"HTTP/1.0 502 Bad Gateway\r\n\r\n<html>x").unwrap();
        assert!(a.is_html());
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
