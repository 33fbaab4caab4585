//! Any text as a license file and as a vendor key file: verification and parsing return
//! errors, never panic. The text is checked as given (the signature line parser) and
//! also signed here with a fixed key first, so that arbitrary content reaches the TOML
//! parser and the field checks behind the signature.
#![no_main]

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use libfuzzer_sys::fuzz_target;
use lmbus_schemas::*;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = VendorKey::from_bytes(&[7; 32]);
    let trusted = key.verifying_key();
    let _ = verify_license(text, "fuzz.lic", &trusted);
    let body = if text.ends_with('\n') || text.is_empty() {
        text.to_owned()
    } else {
        format!("{text}\n")
    };
    let signature =
        base64::engine::general_purpose::STANDARD.encode(key.sign(body.as_bytes()).to_bytes());
    let signed = format!(
        "{body}# lmbus-signature: ed25519 key={} sig={signature}\n",
        key_id(&trusted)
    );
    if let Ok(license) = verify_license(&signed, "fuzz.lic", &trusted) {
        let _ = license.check_dates(time::macros::date!(2026 - 11 - 23), "fuzz.lic");
        let _ = sign_license(&license, &key);
    }
    let _ = parse_public_key(text);
    let _ = parse_secret_key(text);
});
