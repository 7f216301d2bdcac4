package dev.sfs.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.ArrayList;
import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

/**
 * Stands in for the apicurio-common-app-components-config-index Quarkus
 * extension, whose deployment module Maven Central does not serve here. That
 * extension lists the registry's runtime-editable ("dynamic") settings for
 * its admin API; this registry is configured only at start, so the list is
 * empty and every setting keeps its start-up value.
 */
public class DynamicPropertiesProducer {
    @Produces
    @Singleton
    DynamicConfigPropertyList dynamicProperties() {
        return new DynamicConfigPropertyList(new ArrayList<>());
    }
}
