//! Request and response bodies (the JSON contract), with their OpenAPI schemas.

use serde::{Deserialize, Serialize};
use strongroom_store::{Credential, CredentialSummary, VersionInfo, VersionState};
use time::OffsetDateTime;

/// Times in answers: RFC 3339 in UTC with exactly three fraction digits
/// (`2026-11-29T05:07:45.090Z`), the store's precision. Fixed width, so that they sort as
/// text (`time`'s own RFC 3339 drops trailing zeros: `...:45Z`, `...:45.09Z`).
mod millis {
    use serde::Serializer;
    use time::format_description::BorrowedFormatItem;
    use time::OffsetDateTime;

    const FORMAT: &[BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );

    pub(super) fn text(t: OffsetDateTime) -> Result<String, time::error::Format> {
        t.to_offset(time::UtcOffset::UTC).format(FORMAT)
    }

    pub(super) fn one<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*t).map_err(serde::ser::Error::custom)?)
    }

    #[allow(clippy::ref_option)] // the signature `serialize_with` calls
    pub(super) fn option<S: Serializer>(
        t: &Option<OffsetDateTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => one(t, s),
            None => s.serialize_none(),
        }
    }
}
use utoipa::{IntoParams, ToSchema};

/// A number in a path or a query string: decimal digits only, without a sign or leading
/// zeros, so each number has one spelling (`+1`, `01` and `1` are not three ways to say 1).
pub(crate) fn canonical_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

/// A version number in a path ([`canonical_number`]).
#[derive(Debug, Clone, Copy)]
pub struct PathVersion(pub u32);

impl<'de> Deserialize<'de> for PathVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        canonical_number(&text).map(PathVersion).ok_or_else(|| {
            serde::de::Error::custom(
                "the version is a decimal number from 1, without a sign or leading zeros",
            )
        })
    }
}

/// An optional `limit` in a query string ([`canonical_number`]).
fn canonical_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| {
            canonical_number(&text).ok_or_else(|| {
                serde::de::Error::custom(
                    "limit is a decimal number, without a sign or leading zeros",
                )
            })
        })
        .transpose()
}

/// A nested struct read from a JSON object only: serde's derived structs also read an array
/// of their fields in order, a form no client means and no schema allows. (Top-level bodies
/// are checked by [`crate::extract::require_object`].) Duplicate and unknown fields are still
/// the struct's to refuse.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(Object)
    }
}

fn object<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Object::deserialize(d).map(|o| o.0)
}

fn optional_object<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// JSON read with every object's keys unique, at any depth: serde_json keeps the last of a
/// repeated key silently, and what a later reader of the metadata sees would depend on its
/// parser.
struct UniqueKeys(serde_json::Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, SeqAccess, Visitor};
        use serde_json::Value;
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::from(v))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
                Ok(Value::from(v))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value::from(v))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::String(v.to_owned()))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::String(v))
            }
            fn visit_unit<E: Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(UniqueKeys(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let UniqueKeys(v) = map.next_value()?;
                    if out.insert(key, v).is_some() {
                        return Err(A::Error::custom("a key appears twice in one object"));
                    }
                }
                Ok(Value::Object(out))
            }
        }
        d.deserialize_any(V).map(UniqueKeys)
    }
}

fn unique_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    Ok(Option::<UniqueKeys>::deserialize(d)?.map(|u| u.0))
}

/// `PUT .../credentials/{name}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    /// The secret value (1 byte to 64 KiB of UTF-8). Never returned by user routes.
    #[schema(min_length = 1)]
    pub value: String,
    /// Non-secret metadata: a JSON object, each key once, at most 8 KiB, no whole number
    /// past 64 bits (it would come back with other digits: send it as a string). Two keys mean
    /// something to Strongroom: `host` binds the version to the third-party host brokered
    /// calls may send it to (`api.zoom.us`, `host:port`, `*.domain`); `expires_at` (RFC 3339)
    /// is when the version stops being revealed or brokered (410 `version_expired`). Others
    /// are the caller's (labels).
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "unique_keys")]
    pub metadata: Option<serde_json::Value>,
    /// Check-and-set: the version you believe is current (`0`: there must be no current
    /// version: a new credential, or one whose versions were all destroyed). A stale value gets
    /// 409 `version_conflict`.
    #[schema(minimum = 0, maximum = 2147483647)]
    pub expected_version: Option<u32>,
}

/// A stored version (no value).
#[derive(Serialize, ToSchema)]
pub struct PutResponse {
    /// Credential name.
    pub name: String,
    /// The new version, now current.
    pub version: u32,
    /// When it was stored (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// `POST .../current`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CurrentBody {
    /// The version to make current.
    #[schema(minimum = 1, maximum = 2147483647)]
    pub version: u32,
}

/// `POST .../verify`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    /// The candidate value (not empty).
    #[schema(min_length = 1)]
    pub value: String,
}

/// Whether the candidate matched.
#[derive(Serialize, ToSchema)]
pub struct VerifyResponse {
    /// `true` when the candidate equals the current value.
    pub matches: bool,
}

/// `POST .../reveal`.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RevealBody {
    /// A specific version; the current one when absent.
    #[schema(minimum = 1, maximum = 2147483647)]
    pub version: Option<u32>,
}

/// A revealed value. Only the service reveal route returns this. It borrows the value, so
/// the answer is written straight from the zeroizing buffer that holds it.
#[derive(Serialize, ToSchema)]
pub struct RevealResponse<'a> {
    /// The plaintext value.
    pub value: &'a str,
    /// Its version.
    pub version: u32,
}

/// Paging for lists.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "canonical_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// One credential in a list: metadata only.
#[derive(Serialize, ToSchema)]
pub struct CredentialItem {
    /// Name.
    pub name: String,
    /// `enabled` or `disabled`.
    pub state: &'static str,
    /// The current version, if any.
    pub current_version: Option<u32>,
    /// The current version's metadata (`null` when `metadata_unreadable`).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// The current version's `metadata.expires_at` has passed: it is no longer revealed or
    /// brokered (410 `version_expired`) until a new version is put. Read from the stored
    /// metadata; a reveal also checks the expiry against the version's ciphertext.
    pub expired: bool,
    /// The current version's stored metadata does not read (the database was damaged or
    /// edited outside Strongroom): `metadata` is `null`, and the version is not revealed
    /// (500 `integrity_error`). Restore the database, or put a new version.
    pub metadata_unreadable: bool,
    /// Created (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Last changed (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Last revealed or brokered (RFC 3339): a reveal or brokered call, whatever the
    /// upstream answered; written within about a second of it (the audit log and the usage
    /// view have each use at once).
    #[serde(serialize_with = "millis::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
}

/// A page of credentials.
#[derive(Serialize, ToSchema)]
pub struct CredentialList {
    /// This page.
    pub items: Vec<CredentialItem>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One version's facts (no value).
#[derive(Serialize, ToSchema)]
pub struct VersionView {
    /// Version number.
    pub version: u32,
    /// `active` or `destroyed`.
    pub state: &'static str,
    /// Created (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Who stored it (`user:...` or `service:...`).
    pub created_by: String,
    /// Non-secret metadata (`null` when `metadata_unreadable`).
    #[schema(value_type = Option<Object>)]
    pub metadata: serde_json::Value,
    /// An active version whose `metadata.expires_at` has passed: it is no longer revealed or
    /// brokered (410 `version_expired`). Read from the stored metadata; a reveal also checks
    /// the expiry against the version's ciphertext.
    pub expired: bool,
    /// Its stored metadata does not read (the database was damaged or edited outside
    /// Strongroom): `metadata` is `null`, and it is not revealed (500 `integrity_error`).
    /// Restore the database, or destroy this version.
    pub metadata_unreadable: bool,
}

/// A credential with its versions (no values).
#[derive(Serialize, ToSchema)]
pub struct CredentialDetail {
    /// Name.
    pub name: String,
    /// `enabled` or `disabled`.
    pub state: &'static str,
    /// The current version, if any.
    pub current_version: Option<u32>,
    /// Created (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Last changed (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Last revealed or brokered (RFC 3339): a reveal or brokered call, whatever the
    /// upstream answered; written within about a second of it (the audit log and the usage
    /// view have each use at once).
    #[serde(serialize_with = "millis::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    /// One page of versions, newest first, destroyed ones included (at most `limit`, default
    /// 100). A destroyed version is listed until it is more than
    /// `store.keep_destroyed_versions` (default 100) behind the newest.
    pub versions: Vec<VersionView>,
    /// When older versions remain: pass as `cursor` for the next page of `versions`; `null`
    /// on the last page.
    pub versions_next_cursor: Option<String>,
}

/// Paging of a credential's versions.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DescribeQuery {
    /// The `versions_next_cursor` of the previous page (versions older than it follow).
    pub cursor: Option<String>,
    /// Versions per page, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "canonical_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A `versions_next_cursor`: the number of the page's oldest version, the next page holding
/// those below it. Canonical spelling only, and a version number (1 to 2^31 − 1).
pub(crate) fn parse_versions_cursor(c: Option<&str>) -> Result<Option<u32>, crate::ApiError> {
    c.map(|c| {
        canonical_number::<u32>(c)
            .filter(|v| (1..=i32::MAX as u32).contains(v))
            .ok_or_else(|| {
                crate::ApiError::bad_request(
                    "malformed cursor: pass a versions_next_cursor this view gave",
                )
            })
    })
    .transpose()
}

/// A credential's enabled state after disable/enable, or its current version after a choice.
#[derive(Serialize, ToSchema)]
pub struct StateResponse {
    /// Name.
    pub name: String,
    /// `enabled` or `disabled`.
    pub state: &'static str,
    /// The current version.
    pub current_version: Option<u32>,
}

/// Liveness/readiness.
#[derive(Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` or `unavailable`.
    pub status: &'static str,
}

/// One KEK and how many credential versions it wraps.
#[derive(Serialize, ToSchema)]
pub struct KekUsage {
    /// Provider kind.
    pub provider: String,
    /// Key id within the provider.
    pub key_id: String,
    /// KEK version.
    pub version: u32,
    /// Active credential versions whose data key it wraps.
    pub credential_versions: u64,
}

/// Key state for admins.
#[derive(Serialize, ToSchema)]
pub struct KeysResponse {
    /// The KEK new writes use.
    pub active: KekUsage,
    /// Every KEK that still wraps data keys.
    pub in_use: Vec<KekUsage>,
}

/// A key version, by provider, key id and version.
#[derive(Serialize, ToSchema)]
pub struct KeyVersion {
    /// Provider kind.
    pub provider: String,
    /// Key id within the provider.
    pub key_id: String,
    /// KEK version.
    pub version: u32,
}

/// What `POST /v1/keys/rotate` made.
#[derive(Serialize, ToSchema)]
pub struct RotatedKey {
    /// The new active key version.
    pub active: KeyVersion,
    /// What is left to do.
    pub next: &'static str,
}

pub fn state_of(enabled: bool) -> &'static str {
    if enabled {
        "enabled"
    } else {
        "disabled"
    }
}

/// Whether metadata names an expiry at or before `now`. Text under the key that is no time
/// (stored before expiries were checked) is no expiry, as for a reveal.
fn expired(metadata: Option<&serde_json::Value>, now: OffsetDateTime) -> bool {
    matches!(strongroom_core::expiry_of(metadata), Ok(Some(at)) if at <= now)
}

pub fn item(s: CredentialSummary, now: OffsetDateTime) -> CredentialItem {
    CredentialItem {
        state: state_of(s.enabled),
        name: s.name,
        current_version: s.current_version,
        expired: expired(s.current_metadata.as_ref(), now),
        metadata_unreadable: s.current_metadata_unreadable,
        metadata: s.current_metadata,
        created_at: s.created_at,
        updated_at: s.updated_at,
        last_used_at: s.last_used_at,
    }
}

fn version_view(v: VersionInfo, now: OffsetDateTime) -> VersionView {
    let active = v.state == VersionState::Active;
    VersionView {
        version: v.version,
        state: if active { "active" } else { "destroyed" },
        created_at: v.created_at,
        created_by: v.created_by,
        expired: active && expired(Some(&v.metadata), now),
        metadata_unreadable: v.metadata_unreadable,
        metadata: v.metadata,
    }
}

pub fn detail(c: Credential, now: OffsetDateTime) -> CredentialDetail {
    let s = c.summary;
    CredentialDetail {
        state: state_of(s.enabled),
        name: s.name,
        current_version: s.current_version,
        created_at: s.created_at,
        updated_at: s.updated_at,
        last_used_at: s.last_used_at,
        versions: c
            .versions
            .into_iter()
            .map(|v| version_view(v, now))
            .collect(),
        versions_next_cursor: c.versions_next.map(|v| v.to_string()),
    }
}

/// `GET /v1/audit` query.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only records about this owner's credentials.
    pub owner: Option<String>,
    /// Only records about credentials of this name.
    pub name: Option<String>,
    /// Only records made by this principal id (user, service or admin name).
    pub principal: Option<String>,
    /// At or after this time (RFC 3339).
    pub since: Option<String>,
    /// Before this time (RFC 3339).
    pub until: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "canonical_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// `GET .../usage` query.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// From a previous page's `next_cursor` of this credential's usage view (an opaque token).
    pub cursor: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "canonical_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// One audit record (never a value, token or key).
#[derive(Serialize, ToSchema)]
pub struct AuditRecordView {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When (RFC 3339, millisecond precision).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub time: OffsetDateTime,
    /// `user`, `service`, `admin`, `operator` or `anonymous`.
    pub principal_kind: String,
    /// The principal's id (empty if unauthenticated).
    pub principal_id: String,
    /// `put`, `reveal`, `broker`, `verify`, `list`, `describe`, `destroy`, ...
    pub action: String,
    /// Whose credential.
    pub owner: Option<String>,
    /// Which credential.
    pub name: Option<String>,
    /// Which version.
    pub version: Option<u32>,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    /// HTTP status (0 for operator actions).
    pub status: u16,
    /// The request id (`x-request-id`).
    pub request_id: Option<String>,
    /// The client's address.
    pub client_addr: Option<String>,
    /// For service use: the user the service acted for.
    pub on_behalf_of: Option<String>,
    /// For brokered use: where the call went (`https://host[:port]`).
    pub destination: Option<String>,
    /// The stable error code when the outcome is not `ok`.
    pub error_code: Option<String>,
    /// Hash of the previous record (hex).
    pub prev_hash: String,
    /// This record's hash (hex).
    pub hash: String,
}

impl From<strongroom_store::audit::Record> for AuditRecordView {
    fn from(r: strongroom_store::audit::Record) -> Self {
        let e = r.event;
        Self {
            seq: r.seq,
            time: e.time,
            principal_kind: e.principal_kind,
            principal_id: e.principal_id,
            action: e.action,
            owner: e.owner,
            name: e.name,
            version: e.version,
            outcome: e.outcome,
            status: e.status,
            request_id: e.request_id,
            client_addr: e.client_addr,
            on_behalf_of: e.on_behalf_of,
            destination: e.destination,
            error_code: e.error_code,
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}

/// A page of audit records, newest first.
#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// The records.
    pub items: Vec<AuditRecordView>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One use of a credential, as its owner sees it.
#[derive(Serialize, ToSchema)]
pub struct UsageItem {
    /// When (RFC 3339).
    #[serde(serialize_with = "millis::one")]
    #[schema(value_type = String, format = DateTime)]
    pub time: OffsetDateTime,
    /// `reveal` or `broker`.
    pub action: String,
    /// Who: `service`, `user`, ... and their id.
    pub principal_kind: String,
    /// The service's id (the view lists services' uses and attempts only).
    pub principal_id: String,
    /// The user the service acted for (delegated mode): only ever the owner.
    pub on_behalf_of: Option<String>,
    /// For brokered use: where the call went (`https://host[:port]`).
    pub destination: Option<String>,
    /// The version used.
    pub version: Option<u32>,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    /// HTTP status.
    pub status: u16,
}

/// `GET .../usage`: who used the credential, newest first.
#[derive(Serialize, ToSchema)]
pub struct UsageResponse {
    /// Credential name.
    pub name: String,
    /// When a value was last used (also in the credential's metadata): written within about
    /// a second of a use, so the newest item below may be newer.
    #[serde(serialize_with = "millis::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    /// The uses.
    pub items: Vec<UsageItem>,
    /// Pass as `cursor` for the next (older) page.
    pub next_cursor: Option<String>,
}

/// `POST .../broker`: the outbound call to make with the credential injected.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BrokerBody {
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// `https://host[:port]/path?query`. The host must match the version's bound host
    /// (`metadata.host`) and the policy's `destinations`; `http://` is refused.
    pub url: String,
    /// Non-secret headers to send. Framing and hop-by-hop headers, `Accept-Encoding` and the
    /// header the credential goes into are refused.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// A UTF-8 body to send.
    pub body: Option<String>,
    /// Or a binary body, base64 (standard alphabet).
    pub body_base64: Option<String>,
    /// Where the credential goes.
    #[serde(deserialize_with = "object")]
    pub inject: InjectBody,
    /// A specific version; the current one when absent.
    #[schema(minimum = 1, maximum = 2147483647)]
    pub version: Option<u32>,
}

/// Where the credential goes: exactly one of `header` (with an optional `format`), `query`
/// (with an optional `format`) or `basic`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InjectBody {
    /// A header name, e.g. `Authorization`.
    pub header: Option<String>,
    /// A query parameter name, e.g. `api_key` (the value is form-encoded).
    pub query: Option<String>,
    /// HTTP Basic authentication with the credential as the password.
    #[serde(default, deserialize_with = "optional_object")]
    pub basic: Option<BasicBody>,
    /// The header or parameter value, holding `{value}` exactly once (default `{value}`),
    /// e.g. `Bearer {value}`.
    pub format: Option<String>,
}

/// `inject.basic`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicBody {
    /// The user name (no `:`).
    pub username: String,
}

/// The upstream's answer, with the credential value (and its usual encodings) replaced by
/// `[REDACTED]` wherever the upstream echoed it.
#[derive(Serialize, ToSchema)]
pub struct BrokerResponseView {
    /// The upstream's status. Redirects are not followed: a 3xx comes back as is.
    pub status: u16,
    /// The upstream's headers on the allow-list (`Content-Type`, `Location`, `Link`, caching,
    /// `Date`, `Retry-After`, `WWW-Authenticate`, request ids, rate limits, and the
    /// operator's `[broker] pass_response_headers`, each by name);
    /// repeated names joined with `, `.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The body, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body in base64, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// The version whose value was injected.
    pub version: u32,
    /// Whether anything was redacted from the headers or body.
    pub redacted: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_have_three_fraction_digits_in_utc() {
        use time::macros::datetime;
        for (t, want) in [
            (
                datetime!(2026-11-29 05:07:45 UTC),
                "2026-11-29T05:07:45.000Z",
            ),
            (
                datetime!(2026-11-29 05:07:45.09 UTC),
                "2026-11-29T05:07:45.090Z",
            ),
            (
                datetime!(2026-11-29 05:07:45.123456 UTC),
                "2026-11-29T05:07:45.123Z",
            ),
            (
                datetime!(2026-11-29 06:07:45.5 +01:00),
                "2026-11-29T05:07:45.500Z",
            ),
        ] {
            assert_eq!(super::millis::text(t).unwrap(), want);
        }
    }
}
