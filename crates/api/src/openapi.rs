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

const HEADERS_TOO_LARGE: &str = "headers_too_large: the request line and headers (counted as \
     HTTP/1.1 sends them) are over limits.max_header_bytes";

const UNAVAILABLE: &str = "unavailable, key_unavailable, audit_unavailable or timeout: a \
     backing service (store, key provider, audit log) did not answer or refused; retry after \
     Retry-After (seconds)";

/// The responses every route of a kind can give, whatever its handler's own list says: added
/// once here, so the document cannot forget one on a route (the behaviour tests check it).
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in &mut openapi.paths.paths {
            // The head limit holds on every route, probes and this document included.
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .entry("431".to_owned())
                    .or_insert_with(|| error(HEADERS_TOO_LARGE).into());
            }
            if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
                continue;
            }
            let user_route = path.starts_with("/v1/me/");
            // Routes that open a stored value: a version that fails its integrity check (a
            // damaged or edited database) is named as such, not served.
            let opens_a_value = ["/reveal", "/verify", "/broker"]
                .iter()
                .any(|end| path.ends_with(end));
            for (method, op) in [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
            ]
            .into_iter()
            .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
            {
                // Routes without a declared body still read one, to refuse it.
                let takes_body = op.request_body.is_some() || method != "get";
                let responses = &mut op.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description).into());
                };
                add(
                    "400",
                    "bad_request (or a more precise code): a malformed path parameter, a query \
                     string on a route that reads none or with unknown parameters, or a body \
                     this route does not take",
                );
                add(
                    "401",
                    "unauthenticated: no credential, or an invalid or expired one",
                );
                // The body limit holds on every route, whether or not it reads a body.
                add(
                    "413",
                    "payload_too_large: the body is over limits.max_body_bytes",
                );
                if opens_a_value {
                    add(
                        "500",
                        "integrity_error: the stored version failed its integrity check (a \
                         damaged or edited database); nothing is returned",
                    );
                }
                if user_route {
                    add(
                        "403",
                        "forbidden: a service or admin credential on a user route",
                    );
                }
                if takes_body {
                    add(
                        "408",
                        "request_timeout: the body did not arrive within limits.request_timeout_seconds",
                    );
                    add(
                        "415",
                        "unsupported_media_type: a body is sent as JSON, with Content-Type: application/json",
                    );
                }
                add("503", UNAVAILABLE);
                // A route's own 503 (a contended put, a busy broker) can also be any of the
                // common ones, and every 503 says when to retry.
                if let Some(utoipa::openapi::RefOr::T(r)) = responses.get_mut("503") {
                    if r.description != UNAVAILABLE {
                        r.description = format!("{}; or {UNAVAILABLE}", r.description);
                    }
                    r.headers
                        .entry("Retry-After".to_owned())
                        .or_insert_with(|| {
                            utoipa::openapi::header::HeaderBuilder::new()
                                .schema(utoipa::openapi::Object::with_type(
                                    utoipa::openapi::Type::Integer,
                                ))
                                .description(Some("seconds before trying again"))
                                .build()
                        });
                }
            }
        }
    }
}

/// Request bodies a route takes but does not need: a reveal without one reveals the current
/// version. (Declared as `Option<...>`, the schema would admit `null`, which is refused.)
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in &mut openapi.paths.paths {
            if !path.ends_with("/reveal") {
                continue;
            }
            if let Some(body) = item.post.as_mut().and_then(|op| op.request_body.as_mut()) {
                body.required = Some(utoipa::openapi::Required::False);
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Strongroom API", description = "A vault for users' third-party credentials: write-only for people, usable by the services policy allows. Errors are `{\"error\": {\"code\", \"message\"}}`. A method a path does not offer answers 405 `method_not_allowed` with an `Allow` header; a query string on a `/v1` API route that reads none, 400 (this document ignores one)."),
    paths(
        me::put, me::list, me::describe, me::set_current, me::disable, me::enable, me::verify, me::usage,
        me::destroy_version, me::destroy,
        owners::put, owners::reveal, owners::broker,
        admin::keys, admin::rotate, admin::audit,
        health::healthz, health::readyz, health::metrics, health::openapi,
    ),
    components(schemas(crate::ErrorBody, crate::ErrorDetail, views::PutBody, views::PutResponse, views::CurrentBody,
        views::VerifyBody, views::VerifyResponse, views::RevealBody, views::RevealResponse, views::CredentialItem,
        views::CredentialList, views::VersionView, views::CredentialDetail, views::StateResponse,
        views::HealthResponse, views::KekUsage, views::KeysResponse, views::KeyVersion, views::RotatedKey, views::AuditRecordView, views::AuditPage,
        views::UsageItem, views::UsageResponse, views::BrokerBody, views::InjectBody, views::BasicBody,
        views::BrokerResponseView)),
    modifiers(&Security, &CommonResponses, &OptionalBodies),
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
