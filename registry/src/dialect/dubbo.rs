//! Dubbo interface-level registration.
//!
//! A provider is the EPHEMERAL node `/<root>/<interface>/providers/<URLEncoder(url)>`; its data
//! is ignored. The URL is `tri://host:port/<interface>?k=v&...` with the parameters sorted by key,
//! and the whole URL is encoded once with `java.net.URLEncoder`'s rules (`A-Za-z0-9.-*_` kept,
//! space → `+`, every other byte `%XX` upper case):
//!
//! ```
//! use keel_core::{Endpoint, ServiceInstance};
//! use keel_registry::dialect::{dubbo, DubboOptions};
//!
//! let provider = ServiceInstance::new("com.acme.Account", "ignored", Endpoint::new("10.0.0.5", 50051));
//! let url = dubbo::provider_url(&provider, "tri").unwrap();
//! assert_eq!(url, "tri://10.0.0.5:50051/com.acme.Account?interface=com.acme.Account&side=provider");
//! let node = dubbo::encode_node_name(&url);
//! assert_eq!(node, "tri%3A%2F%2F10.0.0.5%3A50051%2Fcom.acme.Account%3Finterface%3Dcom.acme.Account%26side%3Dprovider");
//! let back = dubbo::decode("/dubbo/com.acme.Account/providers", "com.acme.Account", &node, &DubboOptions::default())
//!     .unwrap()
//!     .unwrap();
//! assert_eq!(back.id, "10.0.0.5:50051");
//! ```
//!
//! A discovered provider's id is its `host:port`; its metadata is every URL parameter. A
//! provider with `enabled=false` decodes as `OUT_OF_SERVICE`, so it is not routed to. Keel
//! writes a non-UP status as `enabled=false`.

use std::collections::BTreeMap;

use keel_core::{Endpoint, InstanceStatus, ServiceInstance};

use super::{DecodeError, DubboOptions};

/// Builds the provider URL for `instance` (`service` is the Java interface): every metadata entry
/// becomes a parameter, plus `interface`, `side=provider`, and `enabled=false` when the status
/// is not UP; parameters are sorted by key.
///
/// # Errors
/// Metadata keys or values that would break the URL (`&`, `=`, `?`, `#`, whitespace in keys, `&`
/// and `#` in values), or an `interface` / `side` / `enabled` entry that contradicts the instance.
pub fn provider_url(instance: &ServiceInstance, protocol: &str) -> Result<String, String> {
    let mut params: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in &instance.metadata {
        if k.is_empty() || k.contains(['&', '=', '?', '#', ' ']) || k.chars().any(char::is_control)
        {
            return Err(format!("metadata key {k:?} cannot be a URL parameter"));
        }
        if v.contains(['&', '#']) || v.chars().any(char::is_control) {
            return Err(format!(
                "metadata value {v:?} (key {k:?}) cannot be a URL parameter"
            ));
        }
        params.insert(k, v);
    }
    let fixed = |key: &'static str, value: &str| match params.get(key) {
        Some(existing) if *existing != value => Err(format!(
            "metadata {key}={existing:?} contradicts the instance ({value:?})"
        )),
        _ => Ok(()),
    };
    fixed("interface", &instance.service)?;
    fixed("side", "provider")?;
    let up = instance.status == InstanceStatus::Up;
    if up {
        if params.get("enabled") == Some(&"false") {
            return Err("metadata enabled=false contradicts status UP".to_owned());
        }
    } else {
        fixed("enabled", "false")?;
    }
    if instance.service.is_empty() || instance.service.contains(['/', '?', '&', '#']) {
        return Err(format!(
            "interface {:?} is not a Java interface name",
            instance.service
        ));
    }
    let mut params: BTreeMap<String, String> = params
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    params.insert("interface".into(), instance.service.clone());
    params.insert("side".into(), "provider".into());
    if !up {
        params.insert("enabled".into(), "false".into());
    }
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(format!(
        "{protocol}://{}/{}?{}",
        instance.endpoint,
        instance.service,
        query.join("&")
    ))
}

/// Encodes a URL as a node name exactly like `java.net.URLEncoder.encode(url, "UTF-8")`.
pub fn encode_node_name(url: &str) -> String {
    form_urlencoded::byte_serialize(url.as_bytes()).collect()
}

/// Decodes a node name written by `java.net.URLEncoder` (strictly: a bad `%` escape or
/// non-UTF-8 bytes are an error, not a guess).
pub fn decode_node_name(name: &str) -> Result<String, String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "escapes do not decode to UTF-8".to_owned())
}

/// Decodes the provider node `name` under `parent` for `interface`.
///
/// Returns `Ok(None)` for a well-formed provider this consumer must not use: another protocol,
/// another interface, or a group / version that does not match `options`.
///
/// # Errors
/// A name that is not a URL-encoded URL, or a URL without `protocol://host:port/`.
pub fn decode(
    parent: &str,
    interface: &str,
    name: &str,
    options: &DubboOptions,
) -> Result<Option<ServiceInstance>, DecodeError> {
    let path = format!("{parent}/{name}");
    let err = |reason: String| DecodeError::new(path.as_str(), reason);
    let url = decode_node_name(name).map_err(err)?;
    let (protocol, rest) = url
        .split_once("://")
        .ok_or_else(|| err(format!("{url:?} has no protocol://")))?;
    let (authority, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let endpoint: Endpoint = authority
        .parse()
        .map_err(|e| err(format!("{url:?}: {e}")))?;
    if endpoint.port == 0 {
        return Err(err(format!("{url:?}: port 0")));
    }
    let (url_path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut metadata = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k.is_empty() {
            return Err(err(format!("{url:?}: empty parameter name")));
        }
        metadata.insert(k.to_owned(), v.to_owned());
    }
    if protocol != options.protocol {
        return Ok(None);
    }
    let provided = metadata
        .get("interface")
        .map(String::as_str)
        .unwrap_or(url_path);
    if provided != interface {
        return Ok(None);
    }
    let matches = |wanted: &Option<String>, key: &str| {
        let have = metadata.get(key).map(String::as_str).unwrap_or("");
        match wanted.as_deref() {
            Some("*") => true,
            Some(w) => w == have,
            None => have.is_empty(),
        }
    };
    if !matches(&options.group, "group") || !matches(&options.version, "version") {
        return Ok(None);
    }
    let status = match metadata.get("enabled").map(String::as_str) {
        Some("false") => InstanceStatus::OutOfService,
        _ => InstanceStatus::Up,
    };
    Ok(Some(ServiceInstance {
        service: interface.to_owned(),
        id: endpoint.to_string(),
        endpoint,
        tls: false,
        status,
        metadata,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> ServiceInstance {
        ServiceInstance::new(
            "com.acme.AccountService",
            "x",
            Endpoint::new("10.0.0.5", 50051),
        )
        .with_metadata("version", "1.0.0")
        .with_metadata("application", "account")
        .with_metadata("methods", "open,close")
    }

    /// What `java.net.URLEncoder.encode(url, "UTF-8")` returns for the same URL.
    const GOLDEN: &str = "tri%3A%2F%2F10.0.0.5%3A50051%2Fcom.acme.AccountService%3Fapplication%3Daccount%26interface%3Dcom.acme.AccountService%26methods%3Dopen%2Cclose%26side%3Dprovider%26version%3D1.0.0";

    #[test]
    fn golden_url_sorted_and_encoded_like_java() {
        let url = provider_url(&provider(), "tri").unwrap();
        assert_eq!(
            url,
            "tri://10.0.0.5:50051/com.acme.AccountService?application=account&interface=com.acme.AccountService&methods=open,close&side=provider&version=1.0.0"
        );
        assert_eq!(encode_node_name(&url), GOLDEN);
    }

    #[test]
    fn url_encoder_rules() {
        // Kept: A-Za-z0-9 . - * _ ; space is '+'; '~' and everything else is %XX upper case.
        assert_eq!(encode_node_name("aZ09.-*_"), "aZ09.-*_");
        assert_eq!(encode_node_name("a b~c!'()"), "a+b%7Ec%21%27%28%29");
        assert_eq!(encode_node_name("é/:"), "%C3%A9%2F%3A");
        assert_eq!(decode_node_name("a+b%7Ec%C3%A9").unwrap(), "a b~cé");
        for bad in ["%", "%4", "%zz", "%FF"] {
            assert!(decode_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decodes_golden_with_matching_version() {
        let opts = DubboOptions::default().with_version("1.0.0");
        let got = decode(
            "/dubbo/x/providers",
            "com.acme.AccountService",
            GOLDEN,
            &opts,
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.id, "10.0.0.5:50051");
        assert_eq!(got.endpoint, Endpoint::new("10.0.0.5", 50051));
        assert_eq!(got.status, InstanceStatus::Up);
        assert_eq!(got.metadata.get("application").unwrap(), "account");
        assert_eq!(got.metadata.get("methods").unwrap(), "open,close");
    }

    #[test]
    fn consumer_matching_rules() {
        let p = "/dubbo/x/providers";
        let i = "com.acme.AccountService";
        // No version configured: a versioned provider does not match.
        assert_eq!(
            decode(p, i, GOLDEN, &DubboOptions::default()).unwrap(),
            None
        );
        let any = DubboOptions::default().with_version("*");
        assert!(decode(p, i, GOLDEN, &any).unwrap().is_some());
        assert_eq!(
            decode(p, i, GOLDEN, &any.clone().with_group("g")).unwrap(),
            None
        );
        assert_eq!(decode(p, "com.acme.Other", GOLDEN, &any).unwrap(), None);
        assert_eq!(
            decode(p, i, GOLDEN, &any.clone().with_protocol("dubbo")).unwrap(),
            None
        );
        let disabled = provider().with_status(InstanceStatus::OutOfService);
        let url = provider_url(&disabled, "tri").unwrap();
        assert!(url.contains("enabled=false"));
        let got = decode(p, i, &encode_node_name(&url), &any)
            .unwrap()
            .unwrap();
        assert_eq!(got.status, InstanceStatus::OutOfService);
    }

    #[test]
    fn ipv6_round_trips() {
        let i = ServiceInstance::new("I", "x", Endpoint::new("::1", 8080));
        let url = provider_url(&i, "tri").unwrap();
        assert!(url.starts_with("tri://[::1]:8080/I?"));
        let got = decode("/p", "I", &encode_node_name(&url), &DubboOptions::default())
            .unwrap()
            .unwrap();
        assert_eq!(got.endpoint, Endpoint::new("::1", 8080));
    }

    #[test]
    fn bad_names_are_errors_naming_the_path() {
        let opts = DubboOptions::default();
        for bad in [
            "garbage",
            "%ZZ",
            "tri%3A%2F%2Fhost%2FI",
            "tri%3A%2F%2Fhost%3Axx%2FI",
            "tri%3A%2F%2Fhost%3A0%2FI",
            "tri%3A%2F%2Fh%3A1%2FI%3F%3Dv",
        ] {
            let e = decode("/dubbo/I/providers", "I", bad, &opts).unwrap_err();
            assert_eq!(e.path(), format!("/dubbo/I/providers/{bad}"));
        }
    }

    #[test]
    fn unsafe_metadata_is_refused() {
        let base = ServiceInstance::new("I", "x", Endpoint::new("h", 1));
        assert!(provider_url(&base.clone().with_metadata("a&b", "1"), "tri").is_err());
        assert!(provider_url(&base.clone().with_metadata("a", "1&2"), "tri").is_err());
        assert!(provider_url(&base.clone().with_metadata("interface", "J"), "tri").is_err());
        assert!(provider_url(&base.with_metadata("side", "consumer"), "tri").is_err());
    }
}
