//! Tests of `verify`, `thumbprint`, `Jwk` and `ReplayCache` with real signed proofs.

use std::sync::Arc;

use serde_json::{json, Value};

use super::*;

/// RFC 8037 Appendix A.1: the Ed25519 private key `d` and public key `x`.
const ED_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
/// RFC 8037 Appendix A.3: the thumbprint of that key.
const ED_JKT: &str = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k";

const NOW_MS: u64 = 1_700_000_000_000;
const NOW_S: u64 = NOW_MS / 1000;
const URL: &str = "https://cascade.example/v1/sessions";

/// A test key that signs proofs; fixed bytes, no randomness.
enum Key {
    Ed(ed25519_dalek::SigningKey),
    Ec(p256::ecdsa::SigningKey),
}

impl Key {
    fn ed25519() -> Self {
        let secret: [u8; 32] = b64d(ED_D).try_into().unwrap();
        Key::Ed(ed25519_dalek::SigningKey::from_bytes(&secret))
    }

    fn ed25519_other() -> Self {
        Key::Ed(ed25519_dalek::SigningKey::from_bytes(&[9; 32]))
    }

    fn p256() -> Self {
        Key::Ec(p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap())
    }

    fn p256_other() -> Self {
        Key::Ec(p256::ecdsa::SigningKey::from_slice(&[8; 32]).unwrap())
    }

    fn alg(&self) -> &'static str {
        match self {
            Key::Ed(_) => "EdDSA",
            Key::Ec(_) => "ES256",
        }
    }

    fn jwk(&self) -> Jwk {
        match self {
            Key::Ed(key) => Jwk::Ed25519 { x: b64(key.verifying_key().as_bytes()) },
            Key::Ec(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                Jwk::P256 { x: b64(point.x().unwrap()), y: b64(point.y().unwrap()) }
            }
        }
    }

    fn jwk_json(&self) -> Value {
        serde_json::to_value(self.jwk()).unwrap()
    }

    /// A JWS signature: 64 bytes for Ed25519, r || s for ES256.
    fn sign(&self, input: &[u8]) -> Vec<u8> {
        match self {
            Key::Ed(key) => ed25519_dalek::Signer::sign(key, input).to_bytes().to_vec(),
            Key::Ec(key) => es256_signature(key, input).to_bytes().to_vec(),
        }
    }
}

fn es256_signature(key: &p256::ecdsa::SigningKey, input: &[u8]) -> p256::ecdsa::Signature {
    p256::ecdsa::signature::Signer::sign(key, input)
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64d(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).unwrap()
}

fn header_for(key: &Key) -> Value {
    json!({ "typ": "dpop+jwt", "alg": key.alg(), "jwk": key.jwk_json() })
}

fn claims() -> Value {
    json!({ "jti": "e1j3V_bKic8-LAEB", "htm": "POST", "htu": URL, "iat": NOW_S })
}

/// Signs `header.payload` with `key`, whatever the header says.
fn sign_proof(header: &Value, claims: &Value, key: &Key) -> String {
    let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let signature = key.sign(input.as_bytes());
    format!("{input}.{}", b64(signature))
}

/// A valid proof, after `edit_header` and `edit_claims` have had their say.
fn proof_with(
    key: &Key,
    edit_header: impl FnOnce(&mut Value),
    edit_claims: impl FnOnce(&mut Value),
) -> String {
    let mut header = header_for(key);
    let mut claims = claims();
    edit_header(&mut header);
    edit_claims(&mut claims);
    sign_proof(&header, &claims, key)
}

fn proof(key: &Key) -> String {
    proof_with(key, |_| {}, |_| {})
}

fn header_edit(key: &Key, edit: impl FnOnce(&mut Value)) -> String {
    proof_with(key, edit, |_| {})
}

fn claims_edit(key: &Key, edit: impl FnOnce(&mut Value)) -> String {
    proof_with(key, |_| {}, edit)
}

fn request() -> Request<'static> {
    Request { method: "POST", url: URL, access_token: None }
}

fn check(proof: &str) -> Result<Verified, DpopError> {
    verify(proof, &request(), NOW_MS, &Policy::default())
}

fn check_err(proof: &str) -> DpopError {
    check(proof).unwrap_err()
}

// Valid proofs and thumbprints.

#[test]
fn rfc8037_key_and_thumbprint() {
    assert_eq!(Key::ed25519().jwk(), Jwk::Ed25519 { x: ED_X.to_owned() });
    assert_eq!(thumbprint(&Jwk::Ed25519 { x: ED_X.to_owned() }).unwrap(), ED_JKT);
}

#[test]
fn valid_ed25519_proof_is_accepted() {
    let verified = check(&proof(&Key::ed25519())).unwrap();
    assert_eq!(
        verified,
        Verified { jkt: ED_JKT.to_owned(), jti: "e1j3V_bKic8-LAEB".to_owned(), iat_ms: NOW_S * 1000 }
    );
}

#[test]
fn valid_es256_proof_is_accepted() {
    let key = Key::p256();
    let verified = check(&proof(&key)).unwrap();
    let Jwk::P256 { x, y } = key.jwk() else { unreachable!() };
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    assert_eq!(verified.jkt, b64(Sha256::digest(canonical.as_bytes())));
    assert_eq!(verified.jkt, thumbprint(&key.jwk()).unwrap());
}

/// RFC 9449 §4.2, Figure 3: the example proof, and its key's thumbprint from §6.1.
#[test]
fn rfc9449_example_proof_verifies() {
    let proof = concat!(
        "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklD",
        "UkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2",
        "R1JEQSIsImNydiI6IlAtMjU2In19",
        ".eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29t",
        "L3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ",
        ".2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg",
    );
    let request = Request { method: "POST", url: "https://server.example.com/token", access_token: None };
    let verified = verify(proof, &request, 1_562_262_616_000, &Policy::default()).unwrap();
    assert_eq!(verified.jkt, "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I");
    assert_eq!(verified.jti, "-BwC3ESc6acc2lTc");
}

#[test]
fn unknown_members_are_ignored() {
    let key = Key::ed25519();
    let proof = proof_with(
        &key,
        |h| {
            h["kid"] = json!("k1");
            h["jwk"]["use"] = json!("sig");
        },
        |c| c["nonce"] = json!({ "any": [1, 2] }),
    );
    assert!(check(&proof).is_ok());
}

#[test]
fn jwk_serde_uses_the_json_form() {
    let ed: Jwk =
        serde_json::from_value(json!({ "kty": "OKP", "crv": "Ed25519", "x": ED_X, "alg": "EdDSA" })).unwrap();
    assert_eq!(ed, Jwk::Ed25519 { x: ED_X.to_owned() });
    assert_eq!(serde_json::to_value(&ed).unwrap(), json!({ "kty": "OKP", "crv": "Ed25519", "x": ED_X }));
    let ec = Jwk::P256 { x: "AA".to_owned(), y: "BB".to_owned() };
    let text = serde_json::to_string(&ec).unwrap();
    assert_eq!(text, r#"{"kty":"EC","crv":"P-256","x":"AA","y":"BB"}"#);
    assert_eq!(serde_json::from_str::<Jwk>(&text).unwrap(), ec);
}

#[test]
fn jwk_serde_refuses_private_and_unsupported_keys() {
    let private =
        serde_json::from_value::<Jwk>(json!({ "kty": "OKP", "crv": "Ed25519", "x": ED_X, "d": ED_D }));
    assert_eq!(private.unwrap_err().to_string(), "jwk must not contain a private key");
    let rsa = serde_json::from_value::<Jwk>(json!({ "kty": "RSA", "n": "0vx7", "e": "AQAB" }));
    assert_eq!(
        rsa.unwrap_err().to_string(),
        "unsupported jwk kty RSA crv (none): only OKP/Ed25519 and EC/P-256"
    );
}

#[test]
fn thumbprint_validates_the_key() {
    let short = Jwk::Ed25519 { x: "AAAA".to_owned() };
    assert_eq!(thumbprint(&short), Err(DpopError::BadCoordinate { member: "x", expected: 32 }));
    let off_curve = Jwk::P256 { x: b64([1; 32]), y: b64([2; 32]) };
    assert!(matches!(thumbprint(&off_curve), Err(DpopError::InvalidKey { key: "P-256", .. })));
}

// Header checks.

#[test]
fn wrong_or_missing_typ_is_refused() {
    let key = Key::ed25519();
    let err = check_err(&header_edit(&key, |h| h["typ"] = json!("JWT")));
    assert_eq!(err.to_string(), "typ is JWT, expected dpop+jwt");
    let err = check_err(&header_edit(&key, |h| h["typ"] = json!("DPoP+JWT")));
    assert_eq!(err, DpopError::WrongTyp { found: "DPoP+JWT".to_owned() });
    let err = check_err(&header_edit(&key, |h| drop(h.as_object_mut().unwrap().remove("typ"))));
    assert_eq!(err, DpopError::MissingMember { part: "header", member: "typ" });
    let err = check_err(&header_edit(&key, |h| h["typ"] = json!(1)));
    assert_eq!(err.to_string(), "proof header member typ must be a string");
}

#[test]
fn alg_none_and_hs256_are_refused() {
    let key = Key::ed25519();
    let err = check_err(&header_edit(&key, |h| h["alg"] = json!("HS256")));
    assert_eq!(err.to_string(), "unsupported alg HS256: only EdDSA (Ed25519) and ES256 (P-256)");
    // An unsigned token, as an attacker would send it.
    let header = json!({ "typ": "dpop+jwt", "alg": "none", "jwk": key.jwk_json() });
    let unsigned = format!("{}.{}.", b64(header.to_string()), b64(claims().to_string()));
    assert_eq!(check_err(&unsigned), DpopError::UnsupportedAlg { alg: "none".to_owned() });
}

#[test]
fn alg_must_match_the_key_type() {
    let err = check_err(&header_edit(&Key::p256(), |h| h["alg"] = json!("EdDSA")));
    assert_eq!(err, DpopError::AlgKeyMismatch { alg: "EdDSA", key: "EC/P-256" });
    let err = check_err(&header_edit(&Key::ed25519(), |h| h["alg"] = json!("ES256")));
    assert_eq!(err.to_string(), "alg ES256 does not match the jwk key type OKP/Ed25519");
}

#[test]
fn private_key_in_jwk_is_refused() {
    let err = check_err(&header_edit(&Key::ed25519(), |h| h["jwk"]["d"] = json!(ED_D)));
    assert_eq!(err.to_string(), "jwk must not contain a private key");
    let err = check_err(&header_edit(&Key::p256(), |h| h["jwk"]["d"] = json!(b64([7; 32]))));
    assert_eq!(err, DpopError::PrivateKey);
}

#[test]
fn missing_or_malformed_jwk_is_refused() {
    let key = Key::ed25519();
    let err = check_err(&header_edit(&key, |h| drop(h.as_object_mut().unwrap().remove("jwk"))));
    assert_eq!(err, DpopError::MissingMember { part: "header", member: "jwk" });
    let err = check_err(&header_edit(&key, |h| h["jwk"] = json!(ED_X)));
    assert_eq!(err, DpopError::WrongType { part: "header", member: "jwk", expected: "an object" });
    let err = check_err(&header_edit(&key, |h| h["jwk"]["crv"] = json!("Ed448")));
    assert_eq!(err.to_string(), "unsupported jwk kty OKP crv Ed448: only OKP/Ed25519 and EC/P-256");
    let err = check_err(&header_edit(&key, |h| h["jwk"]["x"] = json!(b64([1; 31]))));
    assert_eq!(err.to_string(), "jwk x must be 32 bytes of base64url without padding");
    let err = check_err(&header_edit(&key, |h| h["jwk"]["x"] = json!(format!("{ED_X}="))));
    assert_eq!(err, DpopError::BadCoordinate { member: "x", expected: 32 });
    let p256 = Key::p256();
    let err = check_err(&header_edit(&p256, |h| drop(h["jwk"].as_object_mut().unwrap().remove("y"))));
    assert_eq!(err, DpopError::MissingMember { part: "jwk", member: "y" });
}

#[test]
fn invalid_points_are_refused() {
    let p256 = Key::p256();
    let err = check_err(&header_edit(&p256, |h| h["jwk"]["y"] = json!(b64([3; 32]))));
    assert_eq!(err.to_string(), "jwk is not a valid P-256 public key: the point is not on the curve");
    let ed = Key::ed25519();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let err = check_err(&header_edit(&ed, |h| h["jwk"]["x"] = json!(b64(identity))));
    assert_eq!(err, DpopError::InvalidKey { key: "Ed25519", reason: "x is a small-order point" });
    // y = p + 1 is a non-canonical encoding of y = 1.
    let mut non_canonical = [0xff; 32];
    non_canonical[0] = 0xee;
    non_canonical[31] = 0x7f;
    let err = check_err(&header_edit(&ed, |h| h["jwk"]["x"] = json!(b64(non_canonical))));
    assert_eq!(err, DpopError::InvalidKey { key: "Ed25519", reason: "x is not a canonical point encoding" });
}

#[test]
fn crit_is_refused() {
    let err = check_err(&header_edit(&Key::ed25519(), |h| h["crit"] = json!(["b64"])));
    assert_eq!(err, DpopError::CritUnsupported);
}

// Signature checks.

#[test]
fn tampered_payload_is_refused() {
    for key in [Key::ed25519(), Key::p256()] {
        let proof = proof(&key);
        let mut parts: Vec<&str> = proof.split('.').collect();
        let mut changed = claims();
        changed["htm"] = json!("DELETE");
        let payload = b64(changed.to_string());
        parts[1] = &payload;
        let tampered = parts.join(".");
        let request = Request { method: "DELETE", ..request() };
        let err = verify(&tampered, &request, NOW_MS, &Policy::default()).unwrap_err();
        assert_eq!(err.to_string(), "signature does not verify");
    }
}

#[test]
fn signature_from_another_key_is_refused() {
    for (key, other) in [(Key::ed25519(), Key::ed25519_other()), (Key::p256(), Key::p256_other())] {
        let forged = sign_proof(&header_for(&key), &claims(), &other);
        assert_eq!(check_err(&forged), DpopError::BadSignature);
    }
}

#[test]
fn es256_der_signature_is_refused() {
    let Key::Ec(signing) = Key::p256() else { unreachable!() };
    let input = format!("{}.{}", b64(header_for(&Key::p256()).to_string()), b64(claims().to_string()));
    let der = es256_signature(&signing, input.as_bytes()).to_der();
    let proof = format!("{input}.{}", b64(der.as_bytes()));
    assert!(matches!(
        check_err(&proof),
        DpopError::SignatureLength { alg: "ES256", expected: 64, found } if found != 64
    ));
}

#[test]
fn signature_of_wrong_length_or_zero_is_refused() {
    let proof = proof(&Key::ed25519());
    let (input, _) = proof.rsplit_once('.').unwrap();
    let err = check_err(&format!("{input}.{}", b64([0; 63])));
    assert_eq!(err.to_string(), "signature is 63 bytes, EdDSA needs 64");
    let proof = self::proof(&Key::p256());
    let (input, _) = proof.rsplit_once('.').unwrap();
    assert_eq!(check_err(&format!("{input}.{}", b64([0; 64]))), DpopError::BadSignature);
}

// Payload checks.

#[test]
fn jti_must_be_a_short_non_empty_string() {
    let key = Key::ed25519();
    assert_eq!(check_err(&claims_edit(&key, |c| c["jti"] = json!(""))), DpopError::EmptyJti);
    let err = check_err(&claims_edit(&key, |c| c["jti"] = json!("j".repeat(129))));
    assert_eq!(err.to_string(), "jti longer than 128 bytes");
    assert!(check(&claims_edit(&key, |c| c["jti"] = json!("j".repeat(128)))).is_ok());
    let err = check_err(&claims_edit(&key, |c| c["jti"] = json!(7)));
    assert_eq!(err, DpopError::WrongType { part: "payload", member: "jti", expected: "a string" });
    let err = check_err(&claims_edit(&key, |c| drop(c.as_object_mut().unwrap().remove("jti"))));
    assert_eq!(err.to_string(), "proof payload has no jti");
}

#[test]
fn wrong_htm_is_refused() {
    let proof = proof(&Key::ed25519());
    let get = Request { method: "GET", ..request() };
    let err = verify(&proof, &get, NOW_MS, &Policy::default()).unwrap_err();
    assert_eq!(err.to_string(), "htm is POST, request is GET");
    let lower = Request { method: "post", ..request() };
    assert!(matches!(verify(&proof, &lower, NOW_MS, &Policy::default()), Err(DpopError::HtmMismatch { .. })));
}

#[test]
fn wrong_htu_is_refused() {
    let key = Key::p256();
    for htu in [
        "https://cascade.example/v1/sessions/other",
        "https://cascade.example/v1/Sessions",
        "http://cascade.example/v1/sessions",
        "https://evil.example/v1/sessions",
        "https://cascade.example:8443/v1/sessions",
    ] {
        let err = check_err(&claims_edit(&key, |c| c["htu"] = json!(htu)));
        assert_eq!(err, DpopError::HtuMismatch { htu: htu.to_owned(), url: URL.to_owned() }, "{htu}");
    }
    let err = check_err(&claims_edit(&key, |c| c["htu"] = json!("/v1/sessions")));
    assert_eq!(err.to_string(), "htu /v1/sessions is not an absolute http(s) URL");
    let bad_request = Request { url: "cascade.example/v1/sessions", ..request() };
    let err = verify(&proof(&key), &bad_request, NOW_MS, &Policy::default()).unwrap_err();
    assert!(matches!(err, DpopError::InvalidRequestUrl { .. }));
}

#[test]
fn htu_matches_despite_query_fragment_case_and_default_port() {
    let key = Key::ed25519();
    for htu in [
        "https://cascade.example/v1/sessions?id=1",
        "https://cascade.example/v1/sessions#top",
        "HTTPS://Cascade.Example:443/v1/sessions",
    ] {
        assert!(check(&claims_edit(&key, |c| c["htu"] = json!(htu))).is_ok(), "{htu}");
    }
    let with_query = Request { url: "https://cascade.example/v1/sessions?page=2", ..request() };
    assert!(verify(&proof(&key), &with_query, NOW_MS, &Policy::default()).is_ok());
}

#[test]
fn iat_outside_the_window_is_refused() {
    let key = Key::ed25519();
    let err = check_err(&claims_edit(&key, |c| c["iat"] = json!(NOW_S - 75)));
    assert_eq!(err.to_string(), "proof iat is 75 s in the past (window 60 s)");
    let err = check_err(&claims_edit(&key, |c| c["iat"] = json!(NOW_S + 61)));
    assert_eq!(err, DpopError::IatInFuture { ahead_ms: 61_000, window_ms: 60_000 });
    assert_eq!(err.to_string(), "proof iat is 61 s in the future (window 60 s)");
    // The window's edges are inside it.
    assert!(check(&claims_edit(&key, |c| c["iat"] = json!(NOW_S - 60))).is_ok());
    assert!(check(&claims_edit(&key, |c| c["iat"] = json!(NOW_S + 60))).is_ok());
}

#[test]
fn iat_must_be_a_non_negative_number() {
    let key = Key::ed25519();
    let verified = check(&claims_edit(&key, |c| c["iat"] = json!(NOW_S as f64 + 0.25))).unwrap();
    assert_eq!(verified.iat_ms, NOW_MS + 250);
    assert_eq!(check_err(&claims_edit(&key, |c| c["iat"] = json!(-1))), DpopError::InvalidIat);
    assert_eq!(check_err(&claims_edit(&key, |c| c["iat"] = json!(-1.5))), DpopError::InvalidIat);
    assert_eq!(check_err(&claims_edit(&key, |c| c["iat"] = json!(u64::MAX))), DpopError::InvalidIat);
    assert_eq!(check_err(&claims_edit(&key, |c| c["iat"] = json!(1e300))), DpopError::InvalidIat);
    let err = check_err(&claims_edit(&key, |c| c["iat"] = json!(NOW_S.to_string())));
    assert_eq!(err.to_string(), "proof payload member iat must be a number");
    let err = check_err(&claims_edit(&key, |c| drop(c.as_object_mut().unwrap().remove("iat"))));
    assert_eq!(err, DpopError::MissingMember { part: "payload", member: "iat" });
}

#[test]
fn ath_is_checked_when_the_request_has_a_token() {
    let key = Key::ed25519();
    let token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
    let with_token = Request { access_token: Some(token), ..request() };
    let check_with_token = |proof: &str| verify(proof, &with_token, NOW_MS, &Policy::default());
    let ath = b64(Sha256::digest(token.as_bytes()));

    let err = check_with_token(&proof(&key)).unwrap_err();
    assert_eq!(err.to_string(), "ath is missing but the request carries an access token");
    let err = check_with_token(&claims_edit(&key, |c| c["ath"] = json!(b64(Sha256::digest(b"other")))))
        .unwrap_err();
    assert_eq!(err.to_string(), "ath does not match the access token");
    let err = check_with_token(&claims_edit(&key, |c| c["ath"] = json!(ath.to_lowercase()))).unwrap_err();
    assert_eq!(err, DpopError::AthMismatch);
    assert!(check_with_token(&claims_edit(&key, |c| c["ath"] = json!(ath))).is_ok());
    // Without a token, an ath is not looked at.
    assert!(check(&claims_edit(&key, |c| c["ath"] = json!("anything"))).is_ok());
}

/// RFC 9449 §7.1: the example access token and its ath.
#[test]
fn ath_matches_the_rfc_example() {
    let token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
    assert_eq!(b64(Sha256::digest(token.as_bytes())), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
}

// Malformed input.

#[test]
fn oversized_proof_is_refused() {
    let proof = claims_edit(&Key::ed25519(), |c| c["pad"] = json!("p".repeat(3000)));
    assert!(proof.len() > 4096);
    assert_eq!(check_err(&proof).to_string(), "proof longer than 4096 bytes");
    let small = Policy { proof_len_max: 100, ..Policy::default() };
    let err = verify(&self::proof(&Key::ed25519()), &request(), NOW_MS, &small).unwrap_err();
    assert_eq!(err, DpopError::ProofTooLong { max: 100 });
}

#[test]
fn garbage_is_refused() {
    assert_eq!(check_err(""), DpopError::SegmentCount { found: 1 });
    assert_eq!(check_err("a.b"), DpopError::SegmentCount { found: 2 });
    assert_eq!(
        check_err("a.b.c.d").to_string(),
        "proof has 4 segments, expected 3 (header.payload.signature)"
    );
    assert_eq!(check_err("!!.e30.AA"), DpopError::NotBase64 { part: "header" });
    assert_eq!(check_err("e30.e30=.AA"), DpopError::NotBase64 { part: "payload" });
    assert_eq!(check_err("e30.e30.A"), DpopError::NotBase64 { part: "signature" });
    assert_eq!(check_err("e30.e30.AA+/"), DpopError::NotBase64 { part: "signature" });
    for header in ["", "[]", "1", "\"dpop+jwt\"", "{", "null", "\u{0}"] {
        let proof = format!("{}.e30.AA", b64(header));
        assert_eq!(check_err(&proof), DpopError::NotJsonObject { part: "header" }, "{header:?}");
    }
    let key = Key::ed25519();
    for payload in ["", "[]", "1", "{"] {
        let input = format!("{}.{}", b64(header_for(&key).to_string()), b64(payload));
        let proof = format!("{input}.{}", b64(key.sign(input.as_bytes())));
        assert_eq!(check_err(&proof).to_string(), "proof payload is not a JSON object");
    }
}

#[test]
fn untrusted_text_in_errors_is_escaped() {
    let err = check_err(&header_edit(&Key::ed25519(), |h| h["typ"] = json!("x\n\u{1b}[31m")));
    assert_eq!(err.to_string(), "typ is x\\n\\u{1b}[31m, expected dpop+jwt");
}

/// Flips, inserts, deletes and truncates bytes of valid proofs: `verify` must never panic, and
/// must accept no changed proof. Strict base64url gives each segment one encoding, and both
/// signature schemes refuse any other signature bytes for the same key and message that a
/// small edit could produce, so no accepted mutation is expected at all.
#[test]
fn mutated_proofs_never_panic_and_are_never_accepted() {
    const ALPHABET: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\"\xff\x00";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |bound: usize| {
        // xorshift64*: deterministic and good enough to spread positions.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % bound.max(1)
    };
    let mut tried = 0;
    for key in [Key::ed25519(), Key::p256()] {
        let original = proof(&key);
        let jkt = check(&original).unwrap().jkt;
        for _ in 0..1500 {
            let mut bytes = original.clone().into_bytes();
            for _ in 0..=next(3) {
                let at = next(bytes.len());
                match next(5) {
                    0 => bytes[at] ^= 1 << next(8),
                    1 => bytes[at] = ALPHABET[next(ALPHABET.len())],
                    2 => bytes.insert(at, ALPHABET[next(ALPHABET.len())]),
                    3 => drop(bytes.remove(at)),
                    _ => bytes.truncate(at),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let mutated = String::from_utf8_lossy(&bytes);
            if mutated == original {
                continue;
            }
            tried += 1;
            if let Ok(verified) = check(&mutated) {
                assert_eq!(verified.jkt, jkt);
                panic!("a changed proof was accepted: {mutated}");
            }
        }
    }
    assert!(tried > 2500, "only {tried} distinct mutations");
}

// Replay cache.

fn verified(jkt: &str, jti: &str, iat_ms: u64) -> Verified {
    Verified { jkt: jkt.to_owned(), jti: jti.to_owned(), iat_ms }
}

#[test]
fn replay_is_refused() {
    let cache = ReplayCache::new(10, 60_000);
    assert!(cache.is_empty());
    let first = check(&proof(&Key::ed25519())).unwrap();
    assert_eq!(cache.check_and_insert(&first, NOW_MS), Ok(()));
    let again = check(&proof(&Key::ed25519())).unwrap();
    assert_eq!(cache.check_and_insert(&again, NOW_MS + 1_000), Err(DpopError::Replayed));
    assert_eq!(cache.len(), 1);
}

#[test]
fn same_jti_from_another_key_is_allowed() {
    let cache = ReplayCache::new(10, 60_000);
    let ed = check(&proof(&Key::ed25519())).unwrap();
    let ec = check(&proof(&Key::p256())).unwrap();
    assert_eq!(ed.jti, ec.jti);
    assert_eq!(cache.check_and_insert(&ed, NOW_MS), Ok(()));
    assert_eq!(cache.check_and_insert(&ec, NOW_MS), Ok(()));
    assert_eq!(cache.len(), 2);
}

#[test]
fn expired_entries_are_pruned() {
    let cache = ReplayCache::new(10, 60_000);
    let old = verified("k", "a", NOW_MS);
    cache.check_and_insert(&old, NOW_MS).unwrap();
    // Still remembered at the last instant verify would accept the proof.
    assert_eq!(cache.check_and_insert(&old, NOW_MS + 60_000), Err(DpopError::Replayed));
    let later = NOW_MS + 60_001;
    cache.check_and_insert(&verified("k", "b", later), later).unwrap();
    assert_eq!(cache.len(), 1);
    // A proof already past its window cannot be remembered, so it is refused.
    let err = cache.check_and_insert(&old, later).unwrap_err();
    assert_eq!(err.to_string(), "proof iat is 60.001 s in the past (window 60 s)");
}

#[test]
fn full_cache_refuses_until_entries_expire() {
    let cache = ReplayCache::new(2, 60_000);
    cache.check_and_insert(&verified("k", "a", NOW_MS), NOW_MS).unwrap();
    cache.check_and_insert(&verified("k", "b", NOW_MS + 10), NOW_MS + 10).unwrap();
    let third = verified("k", "c", NOW_MS + 20);
    let err = cache.check_and_insert(&third, NOW_MS + 20).unwrap_err();
    assert_eq!(err, DpopError::ReplayCacheFull { capacity: 2 });
    assert_eq!(err.to_string(), "replay cache is full (2 unexpired entries)");
    // A replay is still reported as such when the cache is full.
    let replay = cache.check_and_insert(&verified("k", "a", NOW_MS), NOW_MS + 20);
    assert_eq!(replay, Err(DpopError::Replayed));
    // Once "a" has expired there is room again, and "b" is still remembered.
    let fourth = verified("k", "d", NOW_MS + 60_001);
    assert_eq!(cache.check_and_insert(&fourth, NOW_MS + 60_001), Ok(()));
    let b = verified("k", "b", NOW_MS + 10);
    assert_eq!(cache.check_and_insert(&b, NOW_MS + 60_001), Err(DpopError::Replayed));
    assert_eq!(
        ReplayCache::new(0, 1).check_and_insert(&b, NOW_MS),
        Err(DpopError::ReplayCacheFull { capacity: 0 })
    );
}

#[test]
fn concurrent_uses_of_one_proof_succeed_once() {
    let cache = Arc::new(ReplayCache::new(100, 60_000));
    let accepted: usize = (0..8)
        .map(|_| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || cache.check_and_insert(&verified("k", "same", NOW_MS), NOW_MS).is_ok())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|thread| usize::from(thread.join().unwrap()))
        .sum();
    assert_eq!(accepted, 1);
}
