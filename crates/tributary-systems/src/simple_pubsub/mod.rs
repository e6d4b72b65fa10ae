//! simple-pubsub (skeleton: routes, logic, scenario and tests come next).

pub mod topology;

use std::sync::Arc;

use tributary_runtime::SystemMetrics;
use tributary_server::SystemApi;
use tributary_server::utoipa_axum::router::OpenApiRouter;

use crate::{Context, System};

pub const ID: &str = "simple-pubsub";

pub struct Skeleton {
    metrics: SystemMetrics,
}

pub fn start(_context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(Arc::new(Skeleton { metrics: SystemMetrics::new(ID) }))
}

impl System for Skeleton {
    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        SystemApi { id: ID, prefixes: vec![], router: OpenApiRouter::new() }
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.metrics
    }

    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
