//! Request and response bodies (the JSON contract), with their OpenAPI schemas.

use serde::{Deserialize, Serialize};
use strongroom_store::{Credential, CredentialSummary, VersionInfo, VersionState};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

/// `PUT .../credentials/{name}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    /// The secret value (at most 64 KiB of UTF-8). Never returned by user routes.
    pub value: String,
    /// Non-secret metadata (labels, the third-party host, an expiry...): a JSON object.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Check-and-set: the version you believe is current (`0`: the credential must not exist).
    /// A stale value gets 409 `version_conflict`.
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
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// `POST .../current`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CurrentBody {
    /// The version to make current.
    pub version: u32,
}

/// `POST .../verify`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    /// The candidate value.
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
    pub version: Option<u32>,
}

/// A revealed value. Only the service reveal route returns this.
#[derive(Serialize, ToSchema)]
pub struct RevealResponse {
    /// The plaintext value.
    pub value: String,
    /// Its version.
    pub version: u32,
}

/// Paging for lists.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 1000 (default 100).
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
    /// The current version's metadata.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Created (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Last changed (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Last revealed or brokered (RFC 3339).
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
}

/// A page of credentials.
#[derive(Serialize, ToSchema)]
pub struct CredentialList {
    /// This page.
    pub items: Vec<CredentialItem>,
    /// Pass as `cursor` for the next page; absent on the last page.
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
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Who stored it (`user:...` or `service:...`).
    pub created_by: String,
    /// Non-secret metadata.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
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
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Last changed (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Last revealed or brokered (RFC 3339).
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    /// Versions, newest first.
    pub versions: Vec<VersionView>,
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

pub fn state_of(enabled: bool) -> &'static str {
    if enabled {
        "enabled"
    } else {
        "disabled"
    }
}

pub fn item(s: CredentialSummary) -> CredentialItem {
    CredentialItem {
        state: state_of(s.enabled),
        name: s.name,
        current_version: s.current_version,
        metadata: s.current_metadata,
        created_at: s.created_at,
        updated_at: s.updated_at,
        last_used_at: s.last_used_at,
    }
}

fn version_view(v: VersionInfo) -> VersionView {
    VersionView {
        version: v.version,
        state: if v.state == VersionState::Active {
            "active"
        } else {
            "destroyed"
        },
        created_at: v.created_at,
        created_by: v.created_by,
        metadata: v.metadata,
    }
}

pub fn detail(c: Credential) -> CredentialDetail {
    let s = c.summary;
    CredentialDetail {
        state: state_of(s.enabled),
        name: s.name,
        current_version: s.current_version,
        created_at: s.created_at,
        updated_at: s.updated_at,
        last_used_at: s.last_used_at,
        versions: c.versions.into_iter().map(version_view).collect(),
    }
}
