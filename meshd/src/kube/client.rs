//! `kube::Client`s from a kubeconfig file and context, from kubeconfig text, or in-cluster.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::KubeError;

/// A client for `context` (default: the current context) of the kubeconfig at `path`, or
/// the in-cluster service account when `path` is `None`. Never reads `$KUBECONFIG`.
pub async fn client_from_kubeconfig(
    path: Option<&Path>,
    context: Option<&str>,
) -> Result<kube::Client, KubeError> {
    let Some(path) = path else {
        let cfg = kube::Config::incluster().map_err(|e| KubeError::Kubeconfig {
            what: "in-cluster".into(),
            message: e.to_string(),
        })?;
        return kube::Client::try_from(cfg).map_err(|e| KubeError::Kubeconfig {
            what: "in-cluster".into(),
            message: e.to_string(),
        });
    };
    let what = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| KubeError::Kubeconfig {
        what: what.clone(),
        message: format!("read: {e}"),
    })?;
    client_from_kubeconfig_yaml(&what, &text, context).await
}

/// A client for `context` (default: current) of kubeconfig `text`; `what` names it in errors.
pub async fn client_from_kubeconfig_yaml(
    what: &str,
    text: &str,
    context: Option<&str>,
) -> Result<kube::Client, KubeError> {
    let err = |message: String| KubeError::Kubeconfig {
        what: what.to_owned(),
        message,
    };
    let kc = Kubeconfig::from_yaml(text).map_err(|e| err(e.to_string()))?;
    if let Some(ctx) = context
        && !kc.contexts.iter().any(|c| c.name == ctx)
    {
        let names: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
        return Err(err(format!(
            "no context {ctx:?} (contexts: {})",
            names.join(", ")
        )));
    }
    let opts = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let cfg = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .map_err(|e| err(e.to_string()))?;
    kube::Client::try_from(cfg).map_err(|e| err(e.to_string()))
}
