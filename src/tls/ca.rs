//! The mesh CA: its files on disk, bootstrap tokens, and issuing workload certificates.
//!
//! `outrider ca init` writes a root; `outrider ca token` mints a token bound to one identity;
//! `outrider ca serve` (see [`super::ca_server`]) signs CSRs. The identity in a certificate comes
//! from the token (or, for a renewal, from the caller's current certificate), never from the CSR:
//! only the CSR's public key is used.

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use super::spiffe::{SpiffeId, SpiffeIdError};
use super::token::{self, hex, unix_seconds, TokenClaims, TokenError};

/// The root certificate, PEM. This is the trust bundle every sidecar is given.
pub const ROOT_CERT_FILE: &str = "root.pem";
/// The root's private key, PEM, mode 0600.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// The secret that authenticates bootstrap tokens, mode 0600.
pub const TOKEN_SECRET_FILE: &str = "token-secret";
/// The trust domain, one line.
pub const TRUST_DOMAIN_FILE: &str = "trust-domain";

// Issued certificates start a little in the past so that a peer whose clock is behind accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// `ca init` found CA files already there.
    #[error("{0} already exists: refusing to overwrite an existing CA")]
    Exists(PathBuf),
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A CA file is there but its content is unusable.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The trust domain given to `ca init` is not one SPIFFE allows.
    #[error("trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    /// The identity given to `ca token` is not valid.
    #[error("identity: {0}")]
    Identity(#[from] SpiffeIdError),
    /// The identity given to `ca token` is in another trust domain.
    #[error("identity {0} is outside this CA's trust domain {1}")]
    ForeignIdentity(String, String),
    /// Token minting failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Building a certificate failed.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
}

/// Why a CSR was not signed (the token's problems are [`TokenError`]).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CSR can't be parsed or its self-signature doesn't verify.
    #[error("the CSR is invalid: {0}")]
    Csr(String),
    /// The requested lifetime is zero.
    #[error("ttl_seconds must be at least 1")]
    Ttl,
    /// Building the certificate failed.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf then root, PEM.
    pub chain_pem: String,
    /// Unix seconds.
    pub not_after: u64,
    /// Serial number, hex.
    pub serial: String,
}

/// A loaded mesh CA.
pub struct MeshCa {
    trust_domain: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    root_not_after: u64,
    issuer: Issuer<'static, KeyPair>,
    token_secret: Vec<u8>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), CaError> {
    // create_new: never overwrite, even if another `ca init` races us.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::Exists(path.to_owned()),
            _ => CaError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
    f.write_all(content).map_err(io_err(path))
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(io_err(path))
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    offset_from_unix(unix_seconds(t))
}

fn offset_from_unix(secs: u64) -> time::OffsetDateTime {
    // Unix seconds that `time` can't represent are far beyond any certificate's life.
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> Result<(SerialNumber, String), CaError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TokenError::Random)?;
    // Positive and without a leading zero byte, as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok((SerialNumber::from_slice(&bytes), hex(&bytes)))
}

/// A root that signs only end-entity certificates (path length 0). Its name carries the
/// first 8 hex digits of the SHA-256 of its public key (the EC point): during a root
/// rotation two roots of one trust domain are trusted side by side, and under one name a
/// chain from the other root failed as a signature that does not verify (`DecryptError`)
/// where it is an unknown issuer, and `/certs` listed two roots that read the same.
fn root_params(
    trust_domain: &str,
    key: &KeyPair,
    now: SystemTime,
    root_ttl: Duration,
) -> Result<CertificateParams, CaError> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key_raw());
    let key_id = super::token::hex(&digest.as_ref()[..4]);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "outrider");
    dn.push(
        DnType::CommonName,
        format!("outrider mesh root {trust_domain} {key_id}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(now - BACKDATE);
    params.not_after = to_offset(now + root_ttl);
    params.serial_number = Some(random_serial()?.0);
    Ok(params)
}

fn cert_not_after(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

impl MeshCa {
    /// Creates a new CA in `dir`: an ECDSA P-256 self-signed root valid for `root_ttl`, its key
    /// (mode 0600), a token secret (mode 0600) and the trust domain. Refuses if a CA is there.
    pub fn init(dir: &Path, trust_domain: &str, root_ttl: Duration) -> Result<MeshCa, CaError> {
        // Reuse SPIFFE's rules for the trust domain.
        let probe = format!("spiffe://{trust_domain}/x");
        if SpiffeId::parse(&probe).is_err() {
            return Err(CaError::TrustDomain(trust_domain.to_owned()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        for name in [
            ROOT_CERT_FILE,
            ROOT_KEY_FILE,
            TOKEN_SECRET_FILE,
            TRUST_DOMAIN_FILE,
        ] {
            let p = dir.join(name);
            if p.exists() {
                return Err(CaError::Exists(p));
            }
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let params = root_params(trust_domain, &key, now, root_ttl)?;
        let cert = params.self_signed(&key)?;

        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| TokenError::Random)?;
        // The key and secret first: if writing fails half-way, the leftover files still make a
        // second `init` refuse rather than silently pair a new root with an old key.
        write_new(
            &dir.join(ROOT_KEY_FILE),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&dir.join(TOKEN_SECRET_FILE), hex(&secret).as_bytes(), 0o600)?;
        write_new(&dir.join(ROOT_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        write_new(
            &dir.join(TRUST_DOMAIN_FILE),
            format!("{trust_domain}\n").as_bytes(),
            0o644,
        )?;
        tracing::info!(dir = %dir.display(), trust_domain, not_after = unix_seconds(now + root_ttl), "created mesh CA");
        MeshCa::load(dir)
    }

    /// Loads the CA that `init` wrote to `dir`.
    pub fn load(dir: &Path) -> Result<MeshCa, CaError> {
        let td_path = dir.join(TRUST_DOMAIN_FILE);
        let trust_domain = String::from_utf8_lossy(&read(&td_path)?).trim().to_owned();
        if SpiffeId::parse(&format!("spiffe://{trust_domain}/x")).is_err() {
            return Err(CaError::TrustDomain(trust_domain));
        }
        let corrupt = |path: &Path, reason: String| CaError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let cert_path = dir.join(ROOT_CERT_FILE);
        let root_pem =
            String::from_utf8(read(&cert_path)?).map_err(|e| corrupt(&cert_path, e.to_string()))?;
        let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| corrupt(&cert_path, format!("not a PEM certificate: {e}")))?;
        let root_not_after = cert_not_after(&root_der)
            .ok_or_else(|| corrupt(&cert_path, "cannot read the validity".into()))?;
        let key_path = dir.join(ROOT_KEY_FILE);
        let key_pem =
            String::from_utf8(read(&key_path)?).map_err(|e| corrupt(&key_path, e.to_string()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(&key_path, e.to_string()))?;
        if key.public_key_raw()
            != Self::root_public_key(&root_der)
                .as_deref()
                .unwrap_or_default()
        {
            return Err(corrupt(
                &key_path,
                format!("this key does not belong to {}", cert_path.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root_der, key)
            .map_err(|e| corrupt(&cert_path, e.to_string()))?;
        let secret_path = dir.join(TOKEN_SECRET_FILE);
        let token_secret = read(&secret_path)?.trim_ascii().to_vec();
        if token_secret.len() < 32 {
            return Err(corrupt(
                &secret_path,
                "the token secret is shorter than 32 bytes".into(),
            ));
        }
        Ok(MeshCa {
            trust_domain,
            root_pem,
            root_der,
            root_not_after,
            issuer,
            token_secret,
        })
    }

    fn root_public_key(der: &[u8]) -> Option<Vec<u8>> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(cert.public_key().subject_public_key.data.to_vec())
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM: the trust bundle to give sidecars.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Parses `ns/NS/sa/SA` (or a full `spiffe://` ID) as an identity in this trust domain.
    pub fn identity(&self, s: &str) -> Result<SpiffeId, CaError> {
        let id = if s.starts_with("spiffe://") {
            SpiffeId::parse(s)?
        } else {
            SpiffeId::parse(&format!(
                "spiffe://{}/{}",
                self.trust_domain,
                s.trim_start_matches('/')
            ))?
        };
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignIdentity(
                id.to_string(),
                self.trust_domain.clone(),
            ));
        }
        Ok(id)
    }

    /// Mints a bootstrap token for `id`, valid for `ttl`.
    pub fn mint_token(&self, id: &SpiffeId, ttl: Duration) -> Result<String, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignIdentity(
                id.to_string(),
                self.trust_domain.clone(),
            ));
        }
        Ok(token::mint(&self.token_secret, id, ttl, SystemTime::now())?)
    }

    /// Checks a token: MAC, expiry, trust domain.
    pub fn check_token(&self, token: &str) -> Result<TokenClaims, TokenError> {
        token::verify(
            &self.token_secret,
            token,
            &self.trust_domain,
            SystemTime::now(),
        )
    }

    /// Signs `csr_pem` for `id`, valid for `ttl` (capped at the root's own expiry).
    ///
    /// Only the CSR's public key is used, after its self-signature is verified: the leaf's one
    /// SAN is the URI `id`, it has client- and server-auth EKUs and is not a CA.
    pub fn issue(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<Issued, SignError> {
        if ttl.is_zero() {
            return Err(SignError::Ttl);
        }
        // from_pem verifies the CSR's self-signature (proof the requester holds the key).
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::Csr(e.to_string()))?;
        let now = SystemTime::now();
        let not_after = unix_seconds(now + ttl).min(self.root_not_after);
        let mut params = CertificateParams::default();
        // An empty subject makes the SAN extension critical, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| SignError::Csr(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = offset_from_unix(not_after);
        let (serial, serial_hex) = random_serial().map_err(|e| SignError::Csr(e.to_string()))?;
        params.serial_number = Some(serial);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.root_pem),
            not_after,
            serial: serial_hex,
        })
    }

    /// A serving certificate for the CA's own HTTPS listener: `localhost` and `ips` as SANs,
    /// server-auth only, chained to the root. Returns (chain, PKCS#8 key DER).
    pub fn serving_cert(
        &self,
        ips: &[std::net::IpAddr],
        dns: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "outrider mesh CA");
        params.distinguished_name = dn;
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into()?));
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = offset_from_unix(unix_seconds(now + ttl).min(self.root_not_after));
        params.serial_number = Some(random_serial()?.0);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            vec![cert.der().clone(), self.root_der.clone()],
            key.serialize_der(),
        ))
    }
}

/// `outrider ca …`: create a mesh CA, mint bootstrap tokens, serve certificate requests.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create a new mesh root CA in a directory (refuses to overwrite one).
    Init {
        /// The SPIFFE trust domain, e.g. cluster.local.
        #[arg(long)]
        trust_domain: String,
        /// Directory for the CA's files.
        #[arg(long)]
        out: PathBuf,
        /// How long the root is valid.
        #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
        root_ttl: Duration,
    },
    /// Print a bootstrap token that lets one workload get certificates for one identity.
    Token {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// ns/NAMESPACE/sa/SERVICE_ACCOUNT (or a full spiffe:// ID in the CA's trust domain).
        #[arg(long)]
        identity: String,
        /// How long the token can be used.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Serve certificate signing requests over HTTPS (POST /v1/sign).
    Serve {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Longest certificate lifetime handed out; longer requests are cut to this.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        max_ttl: Duration,
        /// Extra DNS names for the CA's serving certificate (e.g. its Kubernetes service name).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// PEM file of another root (the one being rotated out) whose certificates may still
        /// renew themselves here; may be given more than once.
        #[arg(long = "also-trust")]
        also_trust: Vec<PathBuf>,
    },
}

/// Runs an `outrider ca …` command. `serve` runs until Ctrl-C / SIGTERM.
pub async fn run_ca(cmd: CaCommand) -> anyhow::Result<()> {
    super::install_crypto_provider();
    match cmd {
        CaCommand::Init {
            trust_domain,
            out,
            root_ttl,
        } => {
            let ca = MeshCa::init(&out, &trust_domain, root_ttl)?;
            println!(
                "created mesh CA for trust domain {} in {}; give sidecars {} as their ca_bundle",
                ca.trust_domain(),
                out.display(),
                out.join(ROOT_CERT_FILE).display()
            );
        }
        CaCommand::Token { dir, identity, ttl } => {
            let ca = MeshCa::load(&dir)?;
            let id = ca.identity(&identity)?;
            println!("{}", ca.mint_token(&id, ttl)?);
        }
        CaCommand::Serve {
            dir,
            listen,
            max_ttl,
            sans,
            also_trust,
        } => {
            let ca = std::sync::Arc::new(MeshCa::load(&dir)?);
            let mut extra_roots = Vec::new();
            for path in &also_trust {
                // Read as a sidecar reads its bundle: the same checks, the same errors.
                let bundle = super::TrustBundle::from_file(path)
                    .map_err(|e| anyhow::anyhow!("--also-trust {e}"))?;
                extra_roots.extend(bundle.certs());
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("ca serve: cannot listen on {listen}: {e}"))?;
            let opts = super::ca_server::ServeOptions {
                max_ttl,
                extra_dns: sans,
                also_trust: extra_roots,
                ..Default::default()
            };
            let server = super::ca_server::CaServer::start(ca, listener, &opts)?;
            tracing::info!(addr = %server.local_addr(), "mesh CA serving");
            shutdown_signal().await;
            server.shutdown().await;
            tracing::info!("mesh CA stopped");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
