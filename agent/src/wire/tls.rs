//! TLS 1.3 between agents, authenticated by agent id.
//!
//! Each agent presents a self-signed certificate for its own ed25519 key.
//! There is no CA: the TLS handshake proves possession of the key in the
//! certificate, and that key *is* the agent id. The client checks the
//! server's id against the one it expected (when it has one); the server
//! records the client's id and authorizes each request by it. Forward
//! secrecy comes from TLS 1.3's ephemeral key exchange.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::{Error, Result};
use crate::identity::{AgentId, SecretKey};

const ED25519_OID: &str = "1.3.101.112";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Extracts the agent id from a peer certificate (its ed25519 public key).
pub fn agent_id_of(cert: &CertificateDer<'_>) -> Result<AgentId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Tls(format!("peer certificate does not parse: {e}")))?;
    let spki = &parsed.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(Error::Tls("peer certificate key is not ed25519".into()));
    }
    let raw: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| Error::Tls("peer ed25519 key has the wrong length".into()))?;
    let id = AgentId(raw);
    id.verifying_key()?;
    Ok(id)
}

fn self_signed(key: &SecretKey) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let der = PrivatePkcs8KeyDer::from(key.pkcs8_der());
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| Error::Tls(format!("key pair: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec!["caravan-agent".to_string()])
        .map_err(|e| Error::Tls(format!("certificate params: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, key.agent_id().to_string());
    let cert = params
        .self_signed(&kp)
        .map_err(|e| Error::Tls(format!("self-signing: {e}")))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

#[derive(Debug)]
struct PeerVerifier {
    expected: Option<AgentId>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn check(&self, cert: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        let id = agent_id_of(cert).map_err(|e| rustls::Error::General(e.to_string()))?;
        if let Some(want) = &self.expected
            && *want != id
        {
            return Err(rustls::Error::General(format!(
                "peer is {id}, expected {want}"
            )));
        }
        Ok(())
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::General(
                "only ed25519 signatures are accepted".into(),
            ));
        }
        verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn verifier(expected: Option<AgentId>) -> Arc<PeerVerifier> {
    Arc::new(PeerVerifier {
        expected,
        algs: provider().signature_verification_algorithms,
    })
}

/// The server side: requires a client certificate from every peer.
pub fn server_config(key: &SecretKey) -> Result<Arc<rustls::ServerConfig>> {
    let (cert, pk) = self_signed(key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier(None))
        .with_single_cert(vec![cert], pk)
        .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![crate::wire::ALPN.to_vec()];
    // Nothing may follow the handshake on the TLS layer but the channel's
    // ready byte (see `channel::server_switch`); sessions are never resumed.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// The client side: presents our certificate, and pins the server's agent
/// id when we know it.
pub fn client_config(
    key: &SecretKey,
    expected: Option<AgentId>,
) -> Result<Arc<rustls::ClientConfig>> {
    let (cert, pk) = self_signed(key)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier(expected))
        .with_client_auth_cert(vec![cert], pk)
        .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![crate::wire::ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}
