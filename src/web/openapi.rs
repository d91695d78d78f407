//! What the web layer adds to every operation of the OpenAPI document, whatever the
//! routes: the bearer security (see `auth::document`), the `X-Request-Id` header, the
//! rate limiter's 429 and `RateLimit-*` headers. Documented here, next to the code that
//! behaves so, so the document cannot drift from it.

use actix_web::http::Method;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{
    ContentBuilder, Header, HeaderBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder,
};

use super::auth;
use super::problem::PROBLEM_JSON;
use super::rate_limit;

/// Every operation of a path, with its method.
pub fn operations(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
        (Method::OPTIONS, &mut item.options),
        (Method::HEAD, &mut item.head),
        (Method::PATCH, &mut item.patch),
        (Method::TRACE, &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.as_mut().map(|op| (method, op)))
}

/// A problem+json content.
pub fn problem_content() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build()
}

fn header(description: &str, schema_type: Type) -> Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(schema_type))
        .description(Some(description))
        .build()
}

/// Adds the web layer's behaviour to every operation.
pub fn document(openapi: &mut OpenApi) {
    auth::document(openapi);
    for (path, item) in &mut openapi.paths.paths {
        let limited = !rate_limit::is_exempt(path);
        for (_, operation) in operations(item) {
            // Any value is accepted: one that is not short and plain is replaced.
            operation.parameters.get_or_insert_with(Vec::new).push(
                ParameterBuilder::new()
                    .name("X-Request-Id")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some(
                        "The client's id for this request (1 to 128 of A-Z a-z 0-9 - _ . :); \
                         any other value is replaced by a generated one",
                    ))
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build(),
            );
            if limited {
                operation
                    .responses
                    .responses
                    .entry("429".into())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description("The client used up its quota for this kind of request")
                            .header(
                                "Retry-After",
                                header("Seconds until a request may succeed", Type::Integer),
                            )
                            .content(PROBLEM_JSON, problem_content())
                            .build()
                            .into()
                    });
            }
            for response in operation.responses.responses.values_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                response.headers.insert(
                    "X-Request-Id".into(),
                    header(
                        "The request's id (the client's, or generated)",
                        Type::String,
                    ),
                );
                if limited {
                    for (name, description) in [
                        (
                            "RateLimit-Limit",
                            "Requests of this kind the client may send at once",
                        ),
                        ("RateLimit-Remaining", "Requests of this kind left now"),
                        ("RateLimit-Reset", "Seconds until the quota is whole again"),
                    ] {
                        response
                            .headers
                            .insert(name.into(), header(description, Type::Integer));
                    }
                }
            }
        }
    }
}
