//! The OpenAPI 3.1 document, generated from the handlers' annotations.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{admin, health, me, owners, views};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |format: &str, desc: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.bearer_format = Some(format.to_owned());
            http.description = Some(desc.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "user_jwt",
            bearer("JWT", "A user's JWT; its `sub` is the owner id"),
        );
        components.add_security_scheme(
            "service_token",
            bearer(
                "opaque",
                "A service token (or a client certificate mapped to a service)",
            ),
        );
        components.add_security_scheme(
            "admin_token",
            bearer("opaque", "An admin token (or certificate)"),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Strongroom API", description = "A vault for users' third-party credentials: write-only for people, usable by the services policy allows. Errors are `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        me::put, me::list, me::describe, me::set_current, me::disable, me::enable, me::verify, me::usage,
        me::destroy_version, me::destroy,
        owners::put, owners::reveal, owners::broker,
        admin::keys, admin::rotate, admin::audit,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(crate::ErrorBody, crate::ErrorDetail, views::PutBody, views::PutResponse, views::CurrentBody,
        views::VerifyBody, views::VerifyResponse, views::RevealBody, views::RevealResponse, views::CredentialItem,
        views::CredentialList, views::VersionView, views::CredentialDetail, views::StateResponse,
        views::HealthResponse, views::KekUsage, views::KeysResponse, views::KeyVersion, views::RotatedKey, views::AuditRecordView, views::AuditPage,
        views::UsageItem, views::UsageResponse, views::BrokerBody, views::InjectBody, views::BasicBody,
        views::BrokerResponseView)),
    modifiers(&Security),
    tags((name = "user", description = "A user's own credentials (never values)"),
         (name = "service", description = "Services, where policy allows"),
         (name = "admin", description = "Keys and audit"),
         (name = "health", description = "Probes and metrics")),
)]
struct ApiDoc;

/// The OpenAPI document as JSON.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|_| "{}".to_owned())
}
