//! EC2 as a [`Provider`]: workers are bought with `CreateFleet` of type `instant` (one
//! synchronous call that answers with the instances it started and the errors of what it could
//! not start), spot first and on demand for what spot refused, listed by their
//! `nightshift:fleet` tag and ended with `TerminateInstances`.
//!
//! Credentials come from the usual AWS chain (environment, profile, SSO, instance role) through
//! aws-config; the region and an optional endpoint (a local emulator) from [`Ec2Config`].

use std::time::{SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::create_fleet::CreateFleetOutput;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest,
    FleetOnDemandAllocationStrategy, FleetType, InstanceLifecycle, InstanceLifecycleType,
    InstanceStateName, InstanceType, OnDemandOptionsRequest, RequestLaunchTemplateData,
    ResourceType, SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification,
    TargetCapacitySpecificationRequest,
};
use nightshift_proto::CapacityType;

use crate::provider::{Instance, InstanceState, LaunchRequest, Launched, Provider, ProviderError};

/// The tag naming the fleet an instance belongs to; `list` finds the fleet by it.
const FLEET_TAG: &str = "nightshift:fleet";
/// The tag naming the jobs an instance was launched for (comma-separated ids), for people and
/// cost reports reading the console.
const JOBS_TAG: &str = "nightshift:jobs";
/// EC2's display name tag.
const NAME_TAG: &str = "Name";
/// The prefix of every worker's `Name` tag (the fleet name follows).
const NAME_PREFIX: &str = "nightshift-worker-";
/// EC2 refuses tag values longer than this (characters).
const MAX_TAG_VALUE: usize = 256;
/// The template version launched: the newest, so that a template updated by the user's
/// infrastructure takes effect on the next launch without a scaler restart.
const TEMPLATE_VERSION: &str = "$Latest";
/// The states of a live instance (`shutting-down`, `stopped`, `terminated` are not workers).
const LIVE_STATES: [&str; 2] = ["pending", "running"];
/// The largest page DescribeInstances gives (it paginates only when a size is asked for).
const DESCRIBE_PAGE_SIZE: i32 = 1000;
/// TerminateInstances takes at most this many ids per call.
const TERMINATE_BATCH: usize = 1000;
/// `launch-template-name`: DescribeLaunchTemplates' filter, which answers an empty list for a
/// missing template where `LaunchTemplateNames` answers an error.
const TEMPLATE_NAME_FILTER: &str = "launch-template-name";
/// The error code of CreateLaunchTemplate when another scaler created the template first.
const TEMPLATE_EXISTS_CODE: &str = "InvalidLaunchTemplateName.AlreadyExistsException";
/// The codes EC2 gives (per refused override in an instant fleet's `errorSet`) when spot
/// capacity is short. Only these turn a shortfall into an on-demand fallback: other errors
/// (a bad AMI, a missing permission) would fail on demand just the same.
const SPOT_SHORTAGE_CODES: [&str; 5] = [
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "UnfulfillableCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
];
/// The code put in [`Launched::errors`] when the on-demand fallback itself could not be sent.
const TRANSPORT_CODE: &str = "Transport";

/// Where and how the fleet's instances are launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Config {
    /// The value of the `nightshift:fleet` tag: several fleets may share an account.
    pub fleet_name: String,
    pub region: String,
    /// An endpoint other than AWS's (e.g. moto's `http://127.0.0.1:PORT`); None = AWS.
    pub endpoint: Option<String>,
    pub launch_template: LaunchTemplate,
    /// The instance types a worker may run on (at least one); EC2 picks among them.
    pub instance_types: Vec<String>,
    /// The subnets to launch in; empty = the template's subnet, or the default VPC's.
    pub subnets: Vec<String>,
    /// Launch on demand what spot refused for lack of capacity.
    pub on_demand_fallback: bool,
}

/// The launch template the fleet launches from (AMI, user-data, security groups, role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchTemplate {
    /// A template that exists (made by the user's infrastructure).
    Existing { name: String },
    /// Created when missing, with this AMI and user-data (plain text; base64-encoded here).
    /// A template that exists already is used as it is.
    Ensure {
        name: String,
        image_id: String,
        user_data: String,
    },
}

impl LaunchTemplate {
    /// The template's name, as CreateFleet refers to it.
    pub fn name(&self) -> &str {
        match self {
            LaunchTemplate::Existing { name } | LaunchTemplate::Ensure { name, .. } => name,
        }
    }
}

/// EC2 capacity for one fleet.
#[derive(Debug, Clone)]
pub struct Ec2Provider {
    client: Client,
    config: Ec2Config,
}

/// What one CreateFleet answered: the instances it started and the codes of its errors.
struct FleetAnswer {
    instances: Vec<Instance>,
    errors: Vec<String>,
}

impl Ec2Provider {
    /// Builds the client (credentials from the usual AWS chain) and checks the launch template:
    /// an `Existing` one must exist, an `Ensure` one is created when missing.
    pub async fn connect(config: Ec2Config) -> Result<Self, ProviderError> {
        if config.instance_types.is_empty() {
            return Err(ProviderError::Config(
                "the EC2 fleet needs at least one instance type".into(),
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()));
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let client = Client::new(&loader.load().await);
        let provider = Self { client, config };
        provider.check_template().await?;
        Ok(provider)
    }

    async fn check_template(&self) -> Result<(), ProviderError> {
        let name = self.config.launch_template.name();
        if self.template_exists(name).await? {
            return Ok(());
        }
        match &self.config.launch_template {
            LaunchTemplate::Existing { name } => Err(ProviderError::Config(format!(
                "launch template `{name}` not found in {}",
                self.config.region
            ))),
            LaunchTemplate::Ensure {
                name,
                image_id,
                user_data,
            } => self.create_template(name, image_id, user_data).await,
        }
    }

    async fn template_exists(&self, name: &str) -> Result<bool, ProviderError> {
        let found = self
            .client
            .describe_launch_templates()
            .filters(filter(TEMPLATE_NAME_FILTER, [name]))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeLaunchTemplates", e))?;
        Ok(found
            .launch_templates()
            .iter()
            .any(|t| t.launch_template_name() == Some(name)))
    }

    /// Creates the template; one created meanwhile by another scaler of the fleet is as good.
    async fn create_template(
        &self,
        name: &str,
        image_id: &str,
        user_data: &str,
    ) -> Result<(), ProviderError> {
        let data = RequestLaunchTemplateData::builder()
            .image_id(image_id)
            .user_data(aws_smithy_types::base64::encode(user_data))
            .build();
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::LaunchTemplate)
            .tags(tag(FLEET_TAG, &self.config.fleet_name))
            .build();
        let created = self
            .client
            .create_launch_template()
            .launch_template_name(name)
            .launch_template_data(data)
            .tag_specifications(tags)
            .send()
            .await;
        match created.map_err(|e| sdk_error("CreateLaunchTemplate", e)) {
            Err(ProviderError::Api { code, .. }) if code == TEMPLATE_EXISTS_CODE => Ok(()),
            Err(e) => Err(e),
            Ok(_) => {
                tracing::info!(template = name, image_id, "created the launch template");
                Ok(())
            }
        }
    }

    /// One `instant` fleet of `count` instances bought as `capacity`.
    async fn create_fleet(
        &self,
        capacity: CapacityType,
        count: u32,
        tags: &TagSpecification,
    ) -> Result<FleetAnswer, ProviderError> {
        let target = TargetCapacitySpecificationRequest::builder()
            .total_target_capacity(i32::try_from(count).unwrap_or(i32::MAX))
            .default_target_capacity_type(match capacity {
                CapacityType::Spot => DefaultTargetCapacityType::Spot,
                CapacityType::OnDemand => DefaultTargetCapacityType::OnDemand,
            })
            .build();
        let request = self
            .client
            .create_fleet()
            .r#type(FleetType::Instant)
            .launch_template_configs(self.template_config())
            .target_capacity_specification(target)
            .tag_specifications(tags.clone());
        let request = match capacity {
            // Capacity-optimized: the pools least likely to be reclaimed, as a batch job that
            // loses an instance loses its lease's progress.
            CapacityType::Spot => request.spot_options(
                SpotOptionsRequest::builder()
                    .allocation_strategy(SpotAllocationStrategy::CapacityOptimized)
                    .build(),
            ),
            CapacityType::OnDemand => request.on_demand_options(
                OnDemandOptionsRequest::builder()
                    .allocation_strategy(FleetOnDemandAllocationStrategy::LowestPrice)
                    .build(),
            ),
        };
        match request.send().await {
            Ok(answer) => Ok(read_fleet(&answer, capacity)),
            Err(e) => match sdk_error("CreateFleet", e) {
                // A refusal of the whole call for lack of spot capacity is a refusal all the
                // same (an instant fleet usually reports it per override instead).
                ProviderError::Api { code, .. }
                    if capacity == CapacityType::Spot && is_spot_shortage(&code) =>
                {
                    Ok(FleetAnswer {
                        instances: Vec::new(),
                        errors: vec![code],
                    })
                }
                e => Err(e),
            },
        }
    }

    /// The template at its latest version, with one override per instance type and subnet,
    /// so that EC2 may pick any pool that has capacity.
    fn template_config(&self) -> FleetLaunchTemplateConfigRequest {
        let spec = FleetLaunchTemplateSpecificationRequest::builder()
            .launch_template_name(self.config.launch_template.name())
            .version(TEMPLATE_VERSION)
            .build();
        FleetLaunchTemplateConfigRequest::builder()
            .launch_template_specification(spec)
            .set_overrides(Some(self.overrides()))
            .build()
    }

    fn overrides(&self) -> Vec<FleetLaunchTemplateOverridesRequest> {
        let subnets: Vec<Option<&str>> = if self.config.subnets.is_empty() {
            vec![None]
        } else {
            self.config
                .subnets
                .iter()
                .map(|s| Some(s.as_str()))
                .collect()
        };
        let mut overrides = Vec::new();
        for instance_type in &self.config.instance_types {
            for subnet in &subnets {
                overrides.push(
                    FleetLaunchTemplateOverridesRequest::builder()
                        .instance_type(InstanceType::from(instance_type.as_str()))
                        .set_subnet_id(subnet.map(str::to_string))
                        .build(),
                );
            }
        }
        overrides
    }

    /// The tags every launched instance carries: its fleet, its jobs and a readable name.
    fn instance_tags(&self, job_ids: &[i64]) -> TagSpecification {
        let fleet = &self.config.fleet_name;
        TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(tag(FLEET_TAG, fleet))
            .tags(tag(JOBS_TAG, &jobs_tag_value(job_ids)))
            .tags(tag(NAME_TAG, &format!("{NAME_PREFIX}{fleet}")))
            .build()
    }

    /// The on-demand fallback for `shortfall` instances. Once spot started some instances, a
    /// failed fallback is reported in `errors` instead of losing those from the answer.
    async fn fall_back(
        &self,
        launched: &mut Launched,
        shortfall: u32,
        tags: &TagSpecification,
    ) -> Result<(), ProviderError> {
        match self
            .create_fleet(CapacityType::OnDemand, shortfall, tags)
            .await
        {
            Ok(answer) => {
                launched.instances.extend(answer.instances);
                launched.errors.extend(answer.errors);
                Ok(())
            }
            Err(e) if launched.instances.is_empty() => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "the on-demand fallback failed");
                launched.errors.push(match e {
                    ProviderError::Api { code, .. } => code,
                    _ => TRANSPORT_CODE.to_string(),
                });
                Ok(())
            }
        }
    }
}

impl Provider for Ec2Provider {
    async fn launch(&self, req: &LaunchRequest) -> Result<Launched, ProviderError> {
        if req.count == 0 {
            return Ok(Launched::default());
        }
        let tags = self.instance_tags(&req.job_ids);
        let spot = self
            .create_fleet(CapacityType::Spot, req.count, &tags)
            .await?;
        let shortfall = req.count.saturating_sub(count_u32(spot.instances.len()));
        let mut launched = Launched {
            spot_refused: shortfall > 0 && spot.errors.iter().any(|c| is_spot_shortage(c)),
            instances: spot.instances,
            errors: spot.errors,
        };
        if launched.spot_refused && self.config.on_demand_fallback {
            self.fall_back(&mut launched, shortfall, &tags).await?;
        }
        tracing::info!(
            fleet = %self.config.fleet_name,
            asked = req.count,
            started = launched.instances.len(),
            spot_refused = launched.spot_refused,
            errors = ?launched.errors,
            "launched instances"
        );
        Ok(launched)
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter(
                &format!("tag:{FLEET_TAG}"),
                [self.config.fleet_name.as_str()],
            ))
            .filters(filter("instance-state-name", LIVE_STATES))
            .max_results(DESCRIBE_PAGE_SIZE)
            .into_paginator()
            .send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("DescribeInstances", e))?;
            let found = page.reservations().iter().flat_map(|r| r.instances());
            instances.extend(found.filter_map(read_instance));
        }
        Ok(instances)
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        for batch in ids.chunks(TERMINATE_BATCH) {
            self.client
                .terminate_instances()
                .set_instance_ids(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| sdk_error("TerminateInstances", e))?;
            tracing::info!(fleet = %self.config.fleet_name, ids = ?batch, "terminated instances");
        }
        Ok(())
    }
}

/// The instances an instant fleet started and the codes of what it could not start.
fn read_fleet(answer: &CreateFleetOutput, asked: CapacityType) -> FleetAnswer {
    let launched_ms = now_ms();
    let mut instances = Vec::new();
    for group in answer.instances() {
        let capacity_type = match group.lifecycle() {
            Some(InstanceLifecycle::Spot) => CapacityType::Spot,
            Some(_) => CapacityType::OnDemand,
            None => asked,
        };
        let instance_type = group
            .instance_type()
            .map(|t| t.as_str())
            .unwrap_or_default();
        instances.extend(group.instance_ids().iter().map(|id| Instance {
            id: id.clone(),
            instance_type: instance_type.to_string(),
            capacity_type,
            state: InstanceState::Pending,
            launched_ms,
        }));
    }
    let errors = answer
        .errors()
        .iter()
        .filter_map(|e| e.error_code().map(str::to_string))
        .collect();
    FleetAnswer { instances, errors }
}

/// One described instance as the scaler sees it; None for one not pending or running.
fn read_instance(instance: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let state = match instance.state()?.name()? {
        InstanceStateName::Pending => InstanceState::Pending,
        InstanceStateName::Running => InstanceState::Running,
        _ => return None,
    };
    // EC2 names spot (and scheduled, capacity-block) instances; on-demand ones have no
    // lifecycle. Only spot can be reclaimed, so everything else counts as on demand.
    let capacity_type = match instance.instance_lifecycle() {
        Some(InstanceLifecycleType::Spot) => CapacityType::Spot,
        _ => CapacityType::OnDemand,
    };
    Some(Instance {
        id: instance.instance_id()?.to_string(),
        instance_type: instance.instance_type()?.as_str().to_string(),
        capacity_type,
        state,
        launched_ms: instance
            .launch_time()
            .and_then(|t| t.to_millis().ok())
            .unwrap_or(0),
    })
}

fn is_spot_shortage(code: &str) -> bool {
    SPOT_SHORTAGE_CODES.contains(&code)
}

/// An SDK error as a provider error: an answer with an error code is an API error, anything
/// else (no connection, a timeout, an unreadable answer) a transport error.
fn sdk_error<E>(operation: &'static str, err: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match (&err, err.code()) {
        (SdkError::ServiceError(_), Some(code)) => ProviderError::Api {
            operation,
            code: code.to_string(),
            message: err.message().unwrap_or_default().to_string(),
        },
        _ => ProviderError::Transport {
            operation,
            source: anyhow::anyhow!("{}", DisplayErrorContext(&err)),
        },
    }
}

fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    let values = values.into_iter().map(str::to_string).collect();
    Filter::builder()
        .name(name)
        .set_values(Some(values))
        .build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// The job ids, comma-separated, as many as fit in a tag value (the first ones).
fn jobs_tag_value(job_ids: &[i64]) -> String {
    let mut value = String::new();
    for id in job_ids {
        let item = if value.is_empty() {
            id.to_string()
        } else {
            format!(",{id}")
        };
        if value.len() + item.len() > MAX_TAG_VALUE {
            break;
        }
        value.push_str(&item);
    }
    value
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_tag_keeps_whole_ids_within_the_tag_limit() {
        assert_eq!(jobs_tag_value(&[]), "");
        assert_eq!(jobs_tag_value(&[7, 12]), "7,12");
        let many: Vec<i64> = (1_000_000..1_000_100).collect();
        let value = jobs_tag_value(&many);
        assert!(value.len() <= MAX_TAG_VALUE);
        assert!(value.split(',').all(|id| id.len() == 7), "{value}");
    }

    #[test]
    fn only_capacity_codes_are_spot_shortages() {
        assert!(is_spot_shortage("InsufficientInstanceCapacity"));
        assert!(is_spot_shortage("SpotMaxPriceTooLow"));
        assert!(!is_spot_shortage("InvalidParameterValue"));
        assert!(!is_spot_shortage("insufficientinstancecapacity"));
    }
}
