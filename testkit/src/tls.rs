//! A throwaway PKI for TLS tests.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A test CA, and a server certificate it signs for `names` (DNS names or IP addresses), with
/// the certificate's key: `(ca_pem, cert_pem, key_pem)`.
///
/// # Errors
/// When rcgen cannot make them (a name it cannot use).
pub fn test_pki(names: &[&str]) -> Result<(String, String, String), rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let leaf = CertificateParams::new(names)?.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), leaf.pem(), key.serialize_pem()))
}
